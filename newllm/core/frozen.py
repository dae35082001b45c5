"""The base stays frozen: eval mode, no gradients, trainable = 0, weights hash unchanged.

A stage that reads (or trains something against) the frozen base takes `freeze(model)`
before its work and `check_unchanged(model, before, stage)` after it, before writing
anything: a changed weight or a parameter that requires grad is a one-line error (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from newllm.core.base import state_dict_hash
from newllm.core.errors import NewllmError


@dataclass(frozen=True)
class FrozenState:
    total_params: int
    trainable_params: int
    weights_hash: str

    def as_metrics(self) -> dict[str, int | str]:
        return {"total_params": self.total_params, "trainable_params": self.trainable_params,
                "weights_hash_before": self.weights_hash}


def freeze(model: torch.nn.Module) -> FrozenState:
    """`eval()`, `requires_grad_(False)`, and the parameter counts and weights hash now."""
    model.eval().requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable:
        raise NewllmError(f"{trainable} parameters still require grad after freezing.")
    return FrozenState(total, trainable, state_dict_hash(model))


def check_unchanged(model: torch.nn.Module, before: FrozenState, stage: str) -> str:
    """The weights hash after the run; a different one fails the stage (nothing is written)."""
    after = state_dict_hash(model)
    if after != before.weights_hash:
        raise NewllmError(f"{stage}: the base model's weights changed during the run (hash "
                          f"{before.weights_hash[:12]} before, {after[:12]} after); nothing "
                          "was written.")
    if any(p.requires_grad for p in model.parameters()):
        raise NewllmError(f"{stage}: a base model parameter requires grad after the run.")
    return after
