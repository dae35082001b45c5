"""Compressive memory on a pretrained base, the seed's two ways (train-infini-adapter).

The base is any HF causal LM whose decoder layers sit in `model.model.layers` and return the
hidden states (Llama, SmolLM2, Mistral, Qwen...). Text is read in segments; the memory is
carried across the segments of a sequence and detached between them (newllm.infini.memory).

`parallel`: layer 0 is wrapped so that its output becomes

    layer0(x) + α · O·MemoryAttn(LN(x)),   α a learned scalar, initialised to 0,

so at step 0 the logits are exactly the base's (0 · finite = 0 and x + 0 = x in floating
point). Trained on the LM loss, either with every parameter (`freeze_base_model: false`)
or with the base frozen (adapter and α only).

`replace`: (1) distillation: an Infini layer, h + O·MemoryAttn(LN₁ h) + MLP(LN₂ h) (NoPE),
learns by MSE to reproduce layer 0's output from layer 0's input on the corpus, the base
frozen; its held-out error is reported as the share of layer 0's change it misses,
‖f(h) − layer0(h)‖² / ‖h − layer0(h)‖² (0 = exact, 1 = no better than passing h through).
(2) It takes layer 0's place and everything is fine-tuned on the LM loss with parameter
groups: the Infini layer at `layer0_lr_scale` × lr; embeddings, layers 1.. and the final
norm / LM head at `other_lr_scale` × lr.

The trained model is an artifact of kind `infini-adapter` holding every weight that moved
(the whole model after full fine-tuning, only the adapter and α with a frozen base), so
`load_adapted` rebuilds it on the same base and `AdapterScorer` (eval-ppl / eval-reversal
model kind `infini-lm` given such an artifact) reads it, in segments with the memory carried.

Both trainings (distillation and fine-tuning) run on the shared `Trainer` (newllm.core.train):
AdamW without weight decay at a constant learning rate, a seeded shuffle per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from newllm.core.artifacts import load_artifact
from newllm.core.base import BaseInfo
from newllm.core.errors import NewllmError
from newllm.core.hidden import decoder_of, stop_at
from newllm.core.train import TrainConfig, Trainer
from newllm.infini.memory import MemoryAttention, MemoryConfig

ADAPTER_KIND = "infini-adapter"
MODES = ("parallel", "replace")
GROUP = "train_infini_adapter"  # the params group named in errors


class MemoryAdapter(nn.Module):
    """O·MemoryAttn(LN(x)): the read-out of compressive memory, added beside layer 0."""

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(config.d_model)
        self.attn = MemoryAttention(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.ln(x))


class InfiniLayer(nn.Module):
    """A memory-only Infini layer shaped like a decoder layer: h + Memory(LN₁ h) + MLP(LN₂ h)."""

    def __init__(self, config: MemoryConfig, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.attn = MemoryAttention(config)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, d_ff), nn.GELU(),
                                 nn.Linear(d_ff, config.d_model))
        # Start as the identity (both branches' output projections 0): distillation then
        # only has to learn layer 0's change, not first undo a random one.
        for projection in (self.attn.out, self.mlp[-1]):
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.attn(self.ln1(h)) + self.mlp(self.ln2(h))


class ParallelLayer0(nn.Module):
    """layer0(x) + α·adapter(x) in place of decoder layer 0 (same call signature)."""

    def __init__(self, layer0: nn.Module, adapter: MemoryAdapter) -> None:
        super().__init__()
        self.layer0 = layer0
        self.adapter = adapter
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.layer0(hidden_states, *args, **kwargs)
        return out + self.alpha * self.adapter(hidden_states)


class ReplacedLayer0(nn.Module):
    """An Infini layer in place of decoder layer 0 (ignores positions and masks: NoPE)."""

    def __init__(self, infini: InfiniLayer) -> None:
        super().__init__()
        self.infini = infini

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.infini(hidden_states)


def memory_config(model: nn.Module, **options: Any) -> MemoryConfig:
    config = model.config
    return MemoryConfig(config.hidden_size, config.num_attention_heads, "infini", **options)


def attach_parallel(model: nn.Module, config: MemoryConfig) -> ParallelLayer0:
    layers = decoder_of(model).layers
    wrapped = ParallelLayer0(layers[0], MemoryAdapter(config))
    layers[0] = wrapped
    return wrapped


def attach_replace(model: nn.Module, infini: InfiniLayer) -> nn.Module:
    """Put `infini` in layer 0's place; returns the original layer 0."""
    layers = decoder_of(model).layers
    original = layers[0]
    layers[0] = ReplacedLayer0(infini)
    return original


def reset_memory(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, MemoryAttention):
            module.reset_memory()


def _layer_io(args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's (input hidden states, output hidden states) from its hook."""
    hidden_in = args[0] if args else kwargs["hidden_states"]
    hidden_out = output[0] if isinstance(output, tuple) else output
    return hidden_in.detach(), hidden_out.detach()


@torch.no_grad()
def layer0_pairs(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer 0's input, layer 0's output) [B, T, d] of one segment, running the base only up to
    layer 0 (`stop_at` ends the forward there)."""
    return stop_at(decoder_of(model).layers[0],
                   lambda: model(input_ids=batch, use_cache=False), _layer_io)


def _constant_adamw(epochs: int, batch_size: int, lr: float, lr_key: str,
                    device: str | torch.device) -> Trainer:
    """The Trainer of both trainings: AdamW, no weight decay, constant learning rate."""
    return Trainer(TrainConfig(GROUP, epochs, batch_size, lr, optimizer="adamw",
                               weight_decay=0.0, schedule="constant", device=device,
                               lr_key=lr_key))


def distill(infini: InfiniLayer, model: nn.Module, sequences: torch.Tensor,
            segment_length: int, epochs: int, lr: float, batch_size: int,
            generator: torch.Generator, device: str | torch.device = "cpu") -> list[float]:
    """Train `infini` (MSE) to map layer 0's input to its output, memory carried across the
    segments of each sequence; the base is not touched. One step per batch of `batch_size`
    sequences, in a seeded order each epoch. Returns the mean loss per epoch."""
    pairs = []  # layer 0's inputs and outputs of every segment, computed once
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size, :-1]
        pairs.append([layer0_pairs(model, batch[:, s:s + segment_length])
                      for s in range(0, batch.shape[1], segment_length)])

    def loss_fn(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        batch_pairs = pairs[int(rows[0])]  # the Trainer's "examples" are the batches
        infini.attn.reset_memory()
        return sum(F.mse_loss(m(h_in), h_out) for h_in, h_out in batch_pairs) / len(batch_pairs)

    trainer = _constant_adamw(epochs, 1, lr, "distill_lr", device)
    history = trainer.fit(infini, loss_fn, len(pairs), generator, desc="distill")
    return [e.train_loss for e in history]


@torch.no_grad()
def distill_error(infini: InfiniLayer, model: nn.Module, sequences: torch.Tensor,
                  segment_length: int) -> float:
    """‖f(h) − layer0(h)‖² / ‖h − layer0(h)‖² summed over held-out sequences' segments."""
    missed, change = 0.0, 0.0
    for row in sequences:
        infini.attn.reset_memory()
        ids = row[None, :-1]
        for s in range(0, ids.shape[1], segment_length):
            h_in, h_out = layer0_pairs(model, ids[:, s:s + segment_length])
            missed += float(((infini(h_in) - h_out) ** 2).sum())
            change += float(((h_in - h_out) ** 2).sum())
    return missed / max(change, 1e-30)


def parameter_groups(model: nn.Module, lr: float, layer0_lr_scale: float,
                     other_lr_scale: float) -> list[dict[str, Any]]:
    """The seed's groups: layer 0 (the Infini layer or the parallel adapter's layer) at
    lr·layer0_lr_scale; embeddings, layers 1.., final norm and head at lr·other_lr_scale.
    Only trainable parameters, each once (a tied head is the embedding)."""
    layers = decoder_of(model).layers
    seen: set[int] = set()

    def take(params: Any) -> list[nn.Parameter]:
        out = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    groups = [("layer0_infini", take(layers[0].parameters()), lr * layer0_lr_scale),
              ("embeddings", take(model.get_input_embeddings().parameters()),
               lr * other_lr_scale),
              ("layers_1_to_n", take(p for layer in layers[1:] for p in layer.parameters()),
               lr * other_lr_scale),
              ("final", take(model.parameters()), lr * other_lr_scale)]
    return [{"name": name, "params": params, "lr": group_lr}
            for name, params, group_lr in groups if params]


def lm_loss(model: nn.Module, batch: torch.Tensor, segment_length: int) -> torch.Tensor:
    """Mean next-token NLL of sequences [B, L+1] read in segments, memory carried."""
    reset_memory(model)
    total, count = 0.0, 0
    inputs, targets = batch[:, :-1], batch[:, 1:]
    for s in range(0, inputs.shape[1], segment_length):
        logits = model(input_ids=inputs[:, s:s + segment_length], use_cache=False).logits
        seg_targets = targets[:, s:s + segment_length]
        total = total + F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                        seg_targets.reshape(-1), reduction="sum")
        count += seg_targets.numel()
    return total / count


def finetune(model: nn.Module, groups: list[dict[str, Any]], sequences: torch.Tensor,
             segment_length: int, epochs: int, batch_size: int, generator: torch.Generator,
             lr: float, device: str | torch.device = "cpu") -> list[float]:
    """LM-loss fine-tuning over `groups` (each with its own lr; `lr` is the base rate, named
    in errors); mean loss per sequence per epoch."""
    trainer = _constant_adamw(epochs, batch_size, lr, "finetune_lr", device)
    history = trainer.fit(model, lambda m, rows: lm_loss(m, sequences[rows], segment_length),
                          len(sequences), generator, desc="finetune", parameters=groups)
    model.eval()
    return [e.train_loss for e in history]


@torch.no_grad()
def segmented_ppl(model: nn.Module, streams: list[torch.Tensor], segment_length: int) -> float:
    """Token PPL of streams (each [sep, doc]) read in segments, memory carried in each."""
    nll, tokens = 0.0, 0
    for ids in streams:
        if len(ids) < 2:
            continue
        loss = lm_loss(model, ids[None], segment_length)
        nll += float(loss) * (len(ids) - 1)
        tokens += len(ids) - 1
    return math.exp(nll / tokens)


@torch.no_grad()
def segmented_logits(model: nn.Module, ids: torch.Tensor, segment_length: int) -> torch.Tensor:
    """Logits [B, T, V] of ids [B, T] read from an empty memory in segments, memory carried."""
    reset_memory(model)
    return torch.cat([model(input_ids=ids[:, s:s + segment_length], use_cache=False).logits
                      for s in range(0, ids.shape[1], segment_length)], dim=1)


def trained_weights(model: nn.Module, layer0: nn.Module, whole: bool) -> dict[str, torch.Tensor]:
    """What an adapter artifact stores: every weight of the model when the base was
    fine-tuned too (`whole`), else only the new layer 0 (adapter and α, or the Infini layer),
    under its name in the model. A tied LM head is stored once (as the embedding)."""
    if not whole:
        prefix = next(name for name, module in model.named_modules() if module is layer0)
        return {f"{prefix}.{k}": v for k, v in layer0.state_dict().items()
                if not k.startswith("layer0.")}  # the untouched base layer 0 stays out
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return tensors


def load_adapted(model: nn.Module, path: str | Path, base: dict[str, Any]) -> dict[str, Any]:
    """Put a train-infini-adapter artifact onto `model` (the same base, checked by weights):
    wrap or replace layer 0 as it was trained, then load the stored weights. Returns the meta."""
    artifact = load_artifact(path, kind=ADAPTER_KIND, base=base)
    extra = artifact.meta["extra"]
    config = MemoryConfig(**extra["memory_config"])
    if extra["mode"] == "parallel":
        attach_parallel(model, config)
    else:
        attach_replace(model, InfiniLayer(config, extra["d_ff"]))
    missing, unexpected = model.load_state_dict(artifact.tensors, strict=False)
    if extra["whole_model"]:
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        missing = [k for k in missing if k not in tied]
    else:  # only layer 0's new weights are stored; the rest is the base itself
        prefix = "model.layers.0."
        missing = [k for k in missing if k.startswith(prefix)
                   and not k.startswith(prefix + "layer0.")]
    if missing or unexpected:
        raise NewllmError(f"{path} does not fit base.model: missing "
                          f"{', '.join(missing[:3]) or 'none'}, unexpected "
                          f"{', '.join(unexpected[:3]) or 'none'}.")
    return artifact.meta


@dataclass
class AdapterScorer:
    """eval-ppl / eval-reversal model kind `infini-lm` on an adapter artifact: the adapted
    base read in segments of its training length from an empty memory (rows are
    right-padded, so padding only ever precedes a row's own padding in the memory)."""

    model: nn.Module
    segment_length: int
    device: torch.device
    info: BaseInfo
    separator_id: int
    separator_token: str
    max_length: int | None = None

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return segmented_logits(self.model, input_ids, self.segment_length)[:, -keep:]


def load_adapter_scorer(base_params: Any, checkpoint: str | None) -> AdapterScorer:
    """base.model with a train-infini-adapter artifact (model kind `infini-lm` dispatches here
    on the artifact's kind)."""
    from newllm.core.tokens import separator_token_id

    base = base_params.load()
    meta = load_adapted(base.model, checkpoint, base.info.as_dict())
    base.model.eval()
    separator_id = separator_token_id(base.tokenizer, base_params.separator_token)
    return AdapterScorer(base.model.to(base.device), meta["extra"]["segment_length"],
                         base.device, base.info, separator_id,
                         base.tokenizer.convert_ids_to_tokens(separator_id))
