"""Fitting a converter: a held-out split by token id and an MSE regression loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from newllm.errors import NewllmError
from newllm.runtime import progress
from newllm.virtual_tokens.converter import Converter


@dataclass(frozen=True)
class EpochLoss:
    epoch: int
    train_loss: float  # mean MSE over the epoch's training batches
    val_loss: float  # MSE on the held-out pairs after the epoch


def split_by_token(token_ids: torch.Tensor, val_fraction: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, val): a seeded share of the distinct token ids is held out whole."""
    distinct = token_ids.unique()
    n_val = max(1, round(len(distinct) * val_fraction))
    if n_val >= len(distinct):
        raise NewllmError(f"train_converter.val_fraction ({val_fraction}) leaves no training "
                          f"tokens out of {len(distinct)}; extract more pairs or hold out less.")
    held_out = distinct[torch.randperm(len(distinct), generator=generator)[:n_val]]
    is_val = torch.isin(token_ids, held_out)
    return is_val.logical_not().nonzero().flatten(), is_val.nonzero().flatten()


@torch.no_grad()
def mse(converter: Converter, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    total = sum(F.mse_loss(converter(x[i:i + batch_size]), y[i:i + batch_size],
                           reduction="sum").item() for i in range(0, len(x), batch_size))
    return total / y.numel()


def fit_converter(converter: Converter, x_train: torch.Tensor, y_train: torch.Tensor,
                  x_val: torch.Tensor, y_val: torch.Tensor, *, epochs: int, batch_size: int,
                  lr: float, generator: torch.Generator) -> list[EpochLoss]:
    """Adam on the MSE between converter(x) and y; returns the per-epoch train/val loss.

    The learning rate decays to 0 on a cosine over all steps, so the last epoch settles
    instead of hovering at the noise level of a constant-rate Adam.
    """
    converter.init_from_data(x_train, y_train)
    optimizer = torch.optim.Adam(converter.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    history = []
    for epoch in progress(range(1, epochs + 1), desc="train-converter", unit="epoch"):
        converter.train()
        order = torch.randperm(len(x_train), generator=generator)
        summed = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            loss = F.mse_loss(converter(x_train[rows]), y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            summed += loss.item() * len(rows)
        converter.eval()
        history.append(EpochLoss(epoch, summed / len(order), mse(converter, x_val, y_val)))
        if not math.isfinite(history[-1].train_loss):
            raise NewllmError(f"the converter's training loss became {history[-1].train_loss} "
                              f"at epoch {epoch}; lower train_converter.lr ({lr}).")
    return history
