"""Projection editing of MLP outputs with forward hooks that are always removed.

For an MLP output x (per token) and unit directions p̂ = θ_p/‖θ_p‖, n̂ = θ_n/‖θ_n‖:

    edit(x) = alpha·⟨x, p̂⟩p̂ − |beta|·⟨x, n̂⟩n̂,        x ← x + edit(x)

With edit-ratio control (`target_edit_ratio` > 0) the edit of each token is rescaled so
that ‖edit‖/‖x‖ equals the target (alpha and beta then set only the mix of the two
directions); without it the edit is used as is. A projection does not depend on the sign of
its direction, so the edit does not either.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from newllm.core.errors import NewllmError
from newllm.core.hidden import decoder_of, resolve_decoder_layers

_LAYER_IN_PATH = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Target:
    """A module whose output is edited: its dotted path and its decoder layer (or None)."""

    path: str
    layer: int | None


def resolve_targets(model: torch.nn.Module, spec: list[int | str], key: str) -> list[Target]:
    """Decoder layer indices (`[21, 29]`; 0 = the first decoder layer, negative from the end:
    their `.mlp`) or module paths (`model.layers.21.mlp`), in the order given; anything else
    is one clear error naming `key`."""
    decoder = decoder_of(model)
    num_layers = len(decoder.layers)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    names = [s.strip() if isinstance(s, str) else s for s in spec]
    if not names or "" in names:
        raise NewllmError(f"{key} must list decoder layer indices (e.g. [21, 29]) or module "
                          f"paths (e.g. [model.layers.21.mlp]), got {spec!r}.")
    targets = []
    for name in names:
        if isinstance(name, int) or re.fullmatch(r"-?\d+", name):
            index = resolve_decoder_layers([int(name)], num_layers, key)[0]
            targets.append(Target(f"{prefix}.layers.{index}.mlp", index))
            continue
        try:
            model.get_submodule(name)
        except AttributeError:
            raise NewllmError(f"{key}: the model has no module '{name}'; expected a decoder "
                              f"layer index or a module path such as "
                              f"{prefix}.layers.{num_layers - 1}.mlp.") from None
        match = _LAYER_IN_PATH.search(name)
        targets.append(Target(name, int(match.group(1)) if match else None))
    if len({t.path for t in targets}) != len(targets):
        raise NewllmError(f"{key} names a module twice: {spec!r}.")
    return targets


def projection(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """⟨x, v̂⟩ v̂ over the last dimension; `unit` is [d] or [B, d] (one direction per row)."""
    if unit.dim() == 2:
        unit = unit[:, None, :] if x.dim() == 3 else unit
    return (x * unit).sum(-1, keepdim=True) * unit


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def edit_of(x: torch.Tensor, p_hat: torch.Tensor, n_hat: torch.Tensor, alpha: float,
            beta: float, target_edit_ratio: float = 0.0) -> torch.Tensor:
    """The edit (not x + edit) for states `x` [..., d]; see the module docstring."""
    edit = alpha * projection(x, p_hat) - abs(beta) * projection(x, n_hat)
    if target_edit_ratio > 0:
        scale = target_edit_ratio * x.norm(dim=-1, keepdim=True) / \
            edit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        edit = edit * scale
    return edit


@dataclass
class EditStats:
    """What the hooks did: the realized ‖edit‖/‖x‖ and the sum of edits per module."""

    ratio_sum: float = 0.0
    tokens: int = 0
    edit_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    edit_counts: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, x: torch.Tensor, edit: torch.Tensor) -> None:
        # a zero output (a fully masked padding position) gets no edit: it is not counted
        norm = x.norm(dim=-1)
        real = norm > 0
        ratio = edit.norm(dim=-1)[real] / norm[real]
        self.ratio_sum += float(ratio.sum())
        self.tokens += ratio.numel()
        flat = edit.detach()[real].double().sum(0).cpu()
        self.edit_sums[path] = self.edit_sums.get(path, torch.zeros_like(flat)) + flat
        self.edit_counts[path] = self.edit_counts.get(path, 0) + ratio.numel()

    @property
    def mean_ratio(self) -> float:
        return self.ratio_sum / self.tokens if self.tokens else 0.0

    def mean_edit(self, path: str) -> torch.Tensor:
        return (self.edit_sums[path] / max(self.edit_counts[path], 1)).float()


@dataclass
class RowSelect:
    """Which rows of a per-user direction table the current batch holds (set per batch)."""

    index: list[int] | None = None


@dataclass(frozen=True)
class LayerEdit:
    target: Target
    theta_p: torch.Tensor  # [d], or [U, d] with `rows` naming each batch row's user
    theta_n: torch.Tensor
    rows: RowSelect | None = None

    def directions(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, n = self.theta_p, self.theta_n
        if p.dim() == 2:
            if self.rows is None or self.rows.index is None:
                raise RuntimeError("per-user directions need the batch's rows")
            p, n = p[self.rows.index], n[self.rows.index]
        return unit(p.to(like.device, like.dtype)), unit(n.to(like.device, like.dtype))


@contextlib.contextmanager
def projection_edit(model: torch.nn.Module, edits: list[LayerEdit], alpha: float, beta: float,
                    target_edit_ratio: float = 0.0, stats: EditStats | None = None
                    ) -> Iterator[None]:
    """Hooks adding the edit to each target module's output while the block runs.

    The hooks are removed on the way out, also when the block raises. A tuple output has its
    first element edited. Padding positions are edited too; they are masked out downstream.
    """
    handles = []

    def make_hook(layer_edit: LayerEdit) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            x = output[0] if isinstance(output, tuple) else output
            p_hat, n_hat = layer_edit.directions(x)
            edit = edit_of(x, p_hat, n_hat, alpha, beta, target_edit_ratio)
            if stats is not None:
                stats.add(layer_edit.target.path, x, edit)
            edited = x + edit
            return (edited, *output[1:]) if isinstance(output, tuple) else edited
        return hook

    try:
        for layer_edit in edits:
            module = model.get_submodule(layer_edit.target.path)
            handles.append(module.register_forward_hook(make_hook(layer_edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_outputs(model: torch.nn.Module, paths: list[str]) -> contextlib.AbstractContextManager:
    """Record each module's output (first element of a tuple) in a dict while the block runs."""
    @contextlib.contextmanager
    def manager() -> Iterator[dict[str, list[torch.Tensor]]]:
        store: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        handles = []

        def make_hook(path: str) -> Any:
            def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
                store[path].append((output[0] if isinstance(output, tuple) else output).detach())
            return hook

        try:
            for path in paths:
                handles.append(model.get_submodule(path).register_forward_hook(make_hook(path)))
            yield store
        finally:
            for handle in handles:
                handle.remove()

    return manager()
