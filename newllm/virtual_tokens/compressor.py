"""Compressors (seeds/002 §6.2): a text's context hidden states -> k virtual tokens.

- `hyper` (HyperPromptNet): a small pre-norm transformer over `[queries; context]`, where the
  k learned queries attend to the (projected) context hidden states and to each other; the
  outputs at the query positions become the virtual tokens.
- `qattn`: one multi-head query-attention pooling layer: k learned queries attend to the
  context, then a linear map into the input-embedding space.

Both take the hidden states [B, T, d_in] with a mask [B, T] (True = real token) and return
[B, k, d_out]. The output layer's bias starts at the training e*'s mean (and its weight
small), so an untrained compressor already emits the average virtual token and training
moves it from there.

Loss (`compressor_loss`): cosine + relative-norm regression to e*, plus `kl_weight` x the KL
of the frozen base's next-token distributions after `[sep, predicted, follow]` to the stored
teacher top-K, plus an optional hidden-state match at the stored layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from newllm.artifacts import Artifact, load_artifact, save_artifact
from newllm.errors import NewllmError
from newllm.virtual_tokens.e_star import (
    HIDDEN_LOSSES,
    EStarSet,
    continuation_logits,
    hidden_loss_rows,
    separator_rows,
    topk_kl_rows,
)

ARCHS = ("hyper", "qattn")
COMPRESSOR_KIND = "virtual-token-compressor"
COMPRESSOR_FILE = "compressor.safetensors"


@dataclass(frozen=True)
class CompressorConfig:
    arch: str  # hyper | qattn
    input_dim: int  # hidden size of the context hidden states
    output_dim: int  # input-embedding size of the base
    num_virtual: int
    num_heads: int = 8
    num_layers: int = 2  # hyper only
    ffn_dim: int = 2048  # hyper only

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise NewllmError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}.")
        if self.num_virtual < 1:
            raise NewllmError(f"num_virtual must be at least 1, got {self.num_virtual}.")
        if self.output_dim % self.num_heads:
            raise NewllmError(f"train_compressor.num_heads ({self.num_heads}) must divide the "
                              f"base's embedding size {self.output_dim}.")


class Compressor(nn.Module):
    def __init__(self, config: CompressorConfig) -> None:
        super().__init__()
        self.config = config
        d = config.output_dim
        self.in_norm = nn.LayerNorm(config.input_dim)
        self.in_proj = nn.Linear(config.input_dim, d)
        self.queries = nn.Parameter(torch.randn(config.num_virtual, d) * 0.02)
        if config.arch == "hyper":
            layer = nn.TransformerEncoderLayer(d, config.num_heads, config.ffn_dim, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, config.num_layers,
                                              enable_nested_tensor=False)
        else:
            self.body = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d)

    def init_output(self, e_star: torch.Tensor) -> None:
        """Start at the mean training e* (bias) with a small weight."""
        with torch.no_grad():
            self.out_proj.bias.copy_(e_star.reshape(-1, e_star.shape[-1]).mean(dim=0))
            self.out_proj.weight.mul_(0.1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, d_in], mask [B, T] (True = real) -> virtual tokens [B, k, d_out]."""
        context = self.in_proj(self.in_norm(hidden))
        queries = self.queries.expand(len(hidden), -1, -1)
        k = self.config.num_virtual
        if self.config.arch == "hyper":
            pad = torch.cat([torch.zeros(len(hidden), k, dtype=torch.bool, device=mask.device),
                             ~mask.bool()], dim=1)
            out = self.body(torch.cat([queries, context], dim=1), src_key_padding_mask=pad)[:, :k]
        else:
            out, _ = self.body(queries, context, context, key_padding_mask=~mask.bool(),
                               need_weights=False)
            out = out + queries
        return self.out_proj(self.out_norm(out))


def compressor_dir(out_dir: str | Path, arch: str) -> Path:
    return Path(out_dir) / arch


def save_compressor(path: str | Path, compressor: Compressor, *, stage: str,
                    params: dict[str, Any], base: dict[str, Any], extra: dict[str, Any]) -> None:
    weights = {f"compressor.{k}": v for k, v in compressor.state_dict().items()}
    save_artifact(path, weights, kind=COMPRESSOR_KIND, stage=stage, params=params, base=base,
                  extra={"config": asdict(compressor.config), **extra})


def load_compressor(path: str | Path, base: dict[str, Any],
                    device: str | torch.device = "cpu") -> tuple[Compressor, Artifact]:
    """A compressor made from `base` (kind and weights hash checked), in eval mode."""
    artifact = load_artifact(path, kind=COMPRESSOR_KIND, base=base, device=device)
    compressor = Compressor(CompressorConfig(**artifact.meta["extra"]["config"]))
    state = {k.removeprefix("compressor."): v for k, v in artifact.tensors.items()
             if k.startswith("compressor.")}
    compressor.load_state_dict(state)
    return compressor.to(device).eval().requires_grad_(False), artifact


@dataclass(frozen=True)
class LossWeights:
    kl_weight: float = 0.2
    kl_temperature: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss_type: str = "cosine_norm"

    def __post_init__(self) -> None:
        if self.hidden_loss_type not in HIDDEN_LOSSES:
            raise NewllmError(f"hidden_loss_type must be one of {', '.join(HIDDEN_LOSSES)}, "
                              f"got {self.hidden_loss_type!r}.")


def regression_rows(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example (1 - cosine) + squared relative norm error, mean over the k vectors: [B]."""
    cosine = 1 - F.cosine_similarity(predicted, target, dim=-1)
    norm_t = target.norm(dim=-1)
    relative = ((predicted.norm(dim=-1) - norm_t) / norm_t.clamp_min(1e-6)) ** 2
    return (cosine + relative).mean(dim=-1)


def compressor_loss(compressor: nn.Module, model: torch.nn.Module, data: EStarSet,
                    rows: torch.Tensor, sep_id: int, weights: LossWeights,
                    hidden_layer: int | None, device: torch.device) -> torch.Tensor:
    """Mean loss of the examples `rows` of `data` (all of whose tensors are on `device`)."""
    predicted = compressor(data.context_hidden[rows], data.context_mask[rows])
    loss = regression_rows(predicted, data.e_star[rows])
    if weights.kl_weight > 0 or weights.hidden_weight > 0:
        prefixes = torch.cat([separator_rows(model, sep_id, len(rows)).to(predicted.dtype),
                              predicted], dim=1)
        follows = [data.follows[i] for i in rows.tolist()]
        want_hidden = weights.hidden_weight > 0
        logits, mask, hidden = continuation_logits(
            model, list(prefixes), follows, hidden_layer=hidden_layer if want_hidden else None)
        if weights.kl_weight > 0:
            loss = loss + weights.kl_weight * topk_kl_rows(
                logits, data.teacher_logp[rows], data.teacher_ids[rows], mask,
                weights.kl_temperature)
        if want_hidden:
            assert hidden is not None and data.teacher_hidden is not None
            loss = loss + weights.hidden_weight * hidden_loss_rows(
                hidden, data.teacher_hidden[rows], mask, weights.hidden_loss_type)
    return loss.mean()
