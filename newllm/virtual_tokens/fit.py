"""Fitting a converter: a held-out split by token id and an MSE regression loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from newllm.core.errors import NewllmError
from newllm.core.train import Epoch, TrainConfig, Trainer
from newllm.virtual_tokens.converter import Converter


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
                  lr: float, generator: torch.Generator, compute_dtype: str = "float32",
                  device: str | torch.device = "cpu") -> list[Epoch]:
    """Adam on the MSE between converter(x) and y; returns the per-epoch train/val loss.

    The learning rate decays to 0 on a cosine over all steps, so the last epoch settles
    instead of hovering at the noise level of a constant-rate Adam. The converter comes
    back on the CPU, in float32.
    """
    converter.init_from_data(x_train, y_train)
    trainer = Trainer(TrainConfig("train_converter", epochs=epochs, batch_size=batch_size,
                                  lr=lr, compute_dtype=compute_dtype, device=device))
    x, y = x_train.to(trainer.device), y_train.to(trainer.device)
    x_val, y_val = x_val.to(trainer.device), y_val.to(trainer.device)
    history = trainer.fit(converter, lambda model, rows: F.mse_loss(model(x[rows]), y[rows]),
                          len(x), generator, evaluate=lambda model: mse(model, x_val, y_val),
                          desc="train-converter")
    converter.cpu()
    return history
