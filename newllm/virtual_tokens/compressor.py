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

Loss (`compressor_loss`): cosine + relative-norm regression to e* (for the pairs that have
one, when e* has the compressor's k), plus `kl_weight` x the KL
of the frozen base's next-token distributions after `[sep, predicted, follow]` to the stored
teacher top-K, plus an optional hidden-state match at the stored layer, plus an optional
attention match (`attn_weight`) at the decoder layers `attn_decoder_layers`, against the teacher
reading `[sep, text, follow]`, at the positions that predict the follow tokens:

- features (`attn_use_weights` false): the self-attention sublayer's output [C, d] there,
  compared by `hidden_loss_type`;
- weights (`attn_use_weights` true): each head's attention distribution there, pooled into
  2 + C bins that mean the same thing in both readings: the separator, the whole context
  (the text's T tokens for the teacher, the k virtual tokens for the student, summed), and
  each follow token; compared by KL(teacher || student), mean over heads. Fused attention
  kernels return no weights, so the base runs eager attention while these are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from newllm.core.artifacts import Artifact, load_artifact, save_artifact
from newllm.core.errors import NewllmError
from newllm.core.hidden import decoder_of
from newllm.virtual_tokens.e_star import (
    HIDDEN_LOSSES,
    EStarSet,
    continuation_logits,
    continuation_positions,
    embed,
    gather_positions,
    hidden_loss_rows,
    masked_mean,
    read_continuations,
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
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss_type: str = "cosine_norm"
    attn_weight: float = 0.0
    attn_layers: tuple[int, ...] = ()  # decoder layer indices, resolved (0 = first)
    attn_use_weights: bool = False

    def __post_init__(self) -> None:
        if self.hidden_loss_type not in HIDDEN_LOSSES:
            raise NewllmError(f"hidden_loss_type must be one of {', '.join(HIDDEN_LOSSES)}, "
                              f"got {self.hidden_loss_type!r}.")
        if self.attn_weight > 0 and not self.attn_layers:
            raise NewllmError("train_compressor.attn_weight > 0 needs at least one layer in "
                              "attn_decoder_layers.")


def regression_rows(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example (1 - cosine) + squared relative norm error, mean over the k vectors: [B]."""
    cosine = 1 - F.cosine_similarity(predicted, target, dim=-1)
    norm_t = target.norm(dim=-1)
    relative = ((predicted.norm(dim=-1) - norm_t) / norm_t.clamp_min(1e-6)) ** 2
    return (cosine + relative).mean(dim=-1)


# --- attention matching -------------------------------------------------------------------

@contextmanager
def capture_attention(model: torch.nn.Module, layers: Sequence[int],
                      use_weights: bool) -> Iterator[list[torch.Tensor]]:
    """While inside, each forward of `model` appends to the yielded list, per decoder layer of
    `layers` in the order the forward reaches them, its self-attention output [B, T, d] or,
    with `use_weights`, its attention probabilities [B, H, T, T] (eager attention
    meanwhile). Hooks and attention implementation are restored on the way out."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        value = output[1] if use_weights else output[0]
        if value is None:
            raise NewllmError("the base's attention returned no weights although eager "
                              "attention was asked for; set train_compressor.attn_use_weights "
                              "false to match attention outputs instead.")
        captured.append(value)

    decoder_layers = decoder_of(model).layers
    handles = []
    previous = model.config._attn_implementation
    try:
        handles += [decoder_layers[i].self_attn.register_forward_hook(hook) for i in layers]
        if use_weights:
            model.set_attn_implementation("eager")
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        if use_weights:
            model.set_attn_implementation(previous)


def pooled_attention(probs: torch.Tensor, prefix_lengths: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """probs [B, H, T, T], prefix lengths [B] (separator + context), query positions [B, C]
    -> [B, H, C, 2 + C]: the attention each query pays to the separator, to the context (its
    positions summed) and to each continuation token."""
    batch, heads, total, _ = probs.shape
    width = positions.shape[1]
    rows = probs.gather(2, positions[:, None, :, None].expand(batch, heads, width, total))
    keys = torch.arange(total, device=probs.device)[None]  # [1, T]
    starts = prefix_lengths.to(probs.device)[:, None]  # [B, 1]
    in_context = ((keys >= 1) & (keys < starts)).to(rows.dtype)  # [B, T]
    context = (rows * in_context[:, None, None]).sum(dim=-1, keepdim=True)
    follow_keys = starts + torch.arange(width, device=probs.device)[None]  # [B, C]
    valid = (follow_keys < total).to(rows.dtype)
    follow = rows.gather(-1, follow_keys.clamp_max(total - 1)[:, None, None]
                         .expand(batch, heads, width, width)) * valid[:, None, None]
    return torch.cat([rows[..., :1], context, follow], dim=-1)


def attention_features(captured: list[torch.Tensor], prefix_lengths: torch.Tensor,
                       positions: torch.Tensor, use_weights: bool) -> torch.Tensor:
    """What is matched, stacked over layers: [B, L, C, d] outputs or [B, L, H, C, 2 + C]
    pooled weights at `positions`."""
    if use_weights:
        parts = [pooled_attention(p.float(), prefix_lengths, positions) for p in captured]
    else:
        parts = [gather_positions(o, positions).float() for o in captured]
    return torch.stack(parts, dim=1)


def attention_loss_rows(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                        use_weights: bool, kind: str) -> torch.Tensor:
    """Per-row mismatch of `attention_features` at the real positions `mask` [B, C], mean
    over layers (and heads): KL(teacher || student) of the pooled weights, or `kind`."""
    if use_weights:
        per_position = (teacher * (teacher.clamp_min(1e-12).log()
                                   - student.clamp_min(1e-12).log())).sum(dim=-1)
        per_position = per_position.mean(dim=2)  # heads: [B, L, C]
        return torch.stack([masked_mean(per_position[:, layer], mask)
                            for layer in range(per_position.shape[1])], dim=1).mean(dim=1)
    return torch.stack([hidden_loss_rows(student[:, layer], teacher[:, layer], mask, kind)
                        for layer in range(student.shape[1])], dim=1).mean(dim=1)


@torch.no_grad()
def attention_targets(model: torch.nn.Module, sep_id: int, texts: Sequence[torch.Tensor],
                      follows: Sequence[torch.Tensor], layers: Sequence[int],
                      use_weights: bool, batch_size: int = 16) -> torch.Tensor:
    """The teacher's `attention_features` reading `[sep, text, follow]`, every example padded
    to the longest follow C: [N, L, C, d] or [N, L, H, C, 2 + C]."""
    width = max(len(f) for f in follows)
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch_texts = texts[start:start + batch_size]
        batch_follows = follows[start:start + batch_size]
        prefixes = [embed(model, torch.cat([torch.tensor([sep_id], device=t.device), t.long()]))
                    for t in batch_texts]
        # the decoder pass alone: no LM head, whose logits nothing here reads
        with capture_attention(model, layers, use_weights) as captured:
            _, positions, mask = read_continuations(model, prefixes, batch_follows, False,
                                                    "float32")
        lengths = torch.tensor([len(p) for p in prefixes])
        features = attention_features(captured, lengths, positions, use_weights)
        # a row's positions past its own follow (they repeat a real one) are zeros, so the
        # stored targets do not depend on which rows shared a batch
        real = mask.to(features.dtype)
        features = features * (real[:, None, None, :, None] if use_weights
                               else real[:, None, :, None])
        pad = width - features.shape[-2]  # positions; with weights also that many bins
        features = F.pad(features, (0, pad if use_weights else 0, 0, pad))
        chunks.append(features)
    return torch.cat(chunks)


def compressor_loss(compressor: nn.Module, model: torch.nn.Module, data: EStarSet,
                    rows: torch.Tensor, sep_id: int, weights: LossWeights,
                    hidden_layer: int | None, device: torch.device,
                    attn_targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of the examples `rows` of `data` (all of whose tensors are on `device`);
    `attn_targets` are `attention_targets` of all of `data` (needed when attn_weight > 0).

    Per example: the regression to its e* where it has one (and the compressor emits as many
    vectors as e* has), plus the weighted KL and matches, which every example has."""
    predicted = compressor(data.context_hidden[rows], data.context_mask[rows])
    loss = torch.zeros(len(rows), device=predicted.device)
    if predicted.shape[1] == data.num_virtual:  # no e* of this k: KL (and matches) alone
        has = data.has_e_star[rows]
        # a pair without an e* is its own target, so its regression term and gradient are 0
        target = torch.where(has[:, None, None], data.e_star[rows], predicted.detach())
        loss = loss + has.float() * regression_rows(predicted, target)
    want_attention = weights.attn_weight > 0
    if weights.kl_weight > 0 or weights.hidden_weight > 0 or want_attention:
        prefixes = torch.cat([separator_rows(model, sep_id, len(rows)).to(predicted.dtype),
                              predicted], dim=1)
        follows = [data.follows[i] for i in rows.tolist()]
        want_hidden = weights.hidden_weight > 0
        layers = weights.attn_layers if want_attention else ()
        with capture_attention(model, layers,
                               want_attention and weights.attn_use_weights) as captured:
            logits, mask, hidden = continuation_logits(
                model, list(prefixes), follows,
                hidden_layer=hidden_layer if want_hidden else None)
        if weights.kl_weight > 0:
            loss = loss + weights.kl_weight * topk_kl_rows(
                logits, data.teacher_logp[rows], data.teacher_ids[rows], mask,
                weights.kl_temperature)
        if want_hidden:
            assert hidden is not None and data.teacher_hidden is not None
            loss = loss + weights.hidden_weight * hidden_loss_rows(
                hidden, data.teacher_hidden[rows], mask, weights.hidden_loss_type)
        if want_attention:
            assert attn_targets is not None
            width = mask.shape[1]
            prefix_lengths = torch.full((len(rows),), prefixes.shape[1])
            positions, _ = continuation_positions(prefix_lengths.tolist(),
                                                  [len(f) for f in follows],
                                                  prefixes.shape[1] + width, device)
            student = attention_features(captured, prefix_lengths, positions,
                                         weights.attn_use_weights)
            teacher = attn_targets[rows][..., :width, :]
            if weights.attn_use_weights:
                teacher = teacher[..., :2 + width]
            loss = loss + weights.attn_weight * attention_loss_rows(
                student, teacher, mask, weights.attn_use_weights, weights.hidden_loss_type)
    return loss.mean()
