"""Phase 2: train the TokenBlock (only it) on cached contexts, next-token cross-entropy.

Example t reads the cached contexts after token t (per layer) and the embedding of token t
and predicts token t+1. The context blocks are frozen (their contexts come from the cache);
the embeddings are frozen and the head tied to them unless the config says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from newllm.core.base import state_dict_hash
from newllm.core.errors import NewllmError
from newllm.core.train import Epoch, TrainConfig, Trainer
from newllm.cvfp.model import CVFPLM

EVAL_BATCH = 1024  # positions per evaluation step: 1024 x 49k float32 logits is 200 MB


@dataclass
class EpochFigures:
    epoch: int
    train_loss: float
    val_loss: float
    val_ppl: float
    val_accuracy: float


def layer_inputs(contexts: torch.Tensor) -> list[torch.Tensor]:
    """[N, L, D] -> the TokenBlock's per-layer inputs, L x [N, D]."""
    return list(contexts.unbind(dim=1))


def freeze_for_phase2(model: CVFPLM) -> None:
    model.requires_grad_(False)
    for part in model.trainable_parts():
        part.requires_grad_(True)


def parameter_counts(model: CVFPLM) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    head = model.head.weight.numel() if model.head is not None else 0
    return {"parameters_total": total,
            "parameters_trainable": sum(p.numel() for p in model.parameters()
                                        if p.requires_grad),
            "parameters_context_blocks": sum(p.numel() for p in
                                             model.context_blocks.parameters()),
            "parameters_token_block": sum(p.numel() for p in model.token_block.parameters()),
            "parameters_embedding": model.embedding.numel(), "parameters_head": head}


@torch.no_grad()
def evaluate(model: CVFPLM, contexts: torch.Tensor, token_ids: torch.Tensor,
             separator_id: int, device: torch.device) -> tuple[float, float, int]:
    """(mean NLL, accuracy, scored positions) of predicting token t+1 from position t, over
    targets that are not the separator (as eval-ppl scores)."""
    model.eval()
    targets = token_ids[1:]
    rows = torch.nonzero(targets != separator_id).squeeze(1)
    nll, correct = 0.0, 0
    for start in range(0, len(rows), EVAL_BATCH):
        batch = rows[start:start + EVAL_BATCH]
        logits = model.next_token_logits(layer_inputs(contexts[batch].to(device)),
                                         token_ids[batch].to(device))
        wanted = targets[batch].to(device)
        nll += float(F.cross_entropy(logits.float(), wanted, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == wanted).sum())
    return nll / max(len(rows), 1), correct / max(len(rows), 1), len(rows)


def train_token_block(model: CVFPLM, train: tuple[torch.Tensor, torch.Tensor],
                      val: tuple[torch.Tensor, torch.Tensor], separator_id: int,
                      config: TrainConfig, generator: torch.Generator) -> list[EpochFigures]:
    """Train in place; stops with a clear error if anything frozen changed."""
    contexts, token_ids = train
    if len(token_ids) < 2:
        raise NewllmError(f"{config.key}: the cached train stream has fewer than 2 tokens.")
    freeze_for_phase2(model)
    frozen = [model.context_blocks] + ([model.embedding] if model.config.freeze_embeddings
                                       else [])
    before = [_hash(part) for part in frozen]
    trainer = Trainer(config)
    device = trainer.device
    contexts, token_ids = contexts.to(device), token_ids.to(device)

    def loss_fn(m: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(device)
        logits = m.next_token_logits(layer_inputs(contexts[rows]), token_ids[rows])
        return F.cross_entropy(logits.float(), token_ids[rows + 1])

    figures: list[tuple[float, float]] = []

    def on_val(m: torch.nn.Module) -> float:
        loss, accuracy, _ = evaluate(m, val[0], val[1], separator_id, device)
        figures.append((loss, accuracy))
        return loss

    history: list[Epoch] = trainer.fit(model, loss_fn, len(token_ids) - 1, generator,
                                       evaluate=on_val, desc="phase2-token")
    if [_hash(part) for part in frozen] != before:
        raise NewllmError("a frozen part of the CVFP model changed during phase 2 (context "
                          "blocks or embeddings); this is a bug, please report it.")
    return [EpochFigures(e.epoch, e.train_loss, loss, math.exp(loss), accuracy)
            for e, (loss, accuracy) in zip(history, figures, strict=True)]


def _hash(part: torch.nn.Module | torch.nn.Parameter) -> str:
    if isinstance(part, torch.nn.Module):
        return state_dict_hash(part)
    holder = torch.nn.Module()
    holder.register_buffer("value", part.detach())
    return state_dict_hash(holder)
