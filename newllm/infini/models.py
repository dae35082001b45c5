"""The line's language models and `create_model(kind, **options)`.

`pythia`: a small GPT-NeoX-style decoder. Token embedding E (tied with the LM head),
then n_layers blocks with NeoX's parallel residual,

    h ← h + Attn(LN₁(h)) + MLP(LN₂(h)),   MLP(x) = W₂ GELU(W₁ x),

causal multi-head attention with rotary position embeddings (RoPE) on the first
`rotary_pct` of each head's dimensions, and a final LayerNorm before the head.

`infini`, `multi_memory`, `hierarchical`: the same model whose layer 0's attention is
replaced by memory-only Infini-attention (no positional encoding, NoPE; see
`newllm.infini.memory` for the math): h ← h + MemoryAttn(LN₁(h)) + MLP(LN₂(h)). Layer 0
reads only what earlier segments left in memory; layers 1.. attend within the segment with
RoPE. The memory read-out uses the same Q, K, V, O projections as attention, so the kinds
differ by at most a few parameters (the hierarchical gate).

A model reads one segment per call; `forward(ids, update_memory=True)` then writes the
segment to memory, so calling it on consecutive segments carries memory across them.
The memory API: `reset_memory()`, `get_memory_state()` (every memory and normalizer, the
current bank / memory index and the segment counter), `set_memory_state(state)`, and
`save_memory_state(path)` / `load_memory_state(path)`: safetensors with the model config
and a content hash in the metadata, so memory moves to another machine; a state of another
shape or config is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from newllm.core.artifacts import load_artifact, save_artifact
from newllm.core.errors import NewllmError
from newllm.infini import LM_KINDS
from newllm.infini.memory import MEMORY_GRADIENTS, MemoryAttention, MemoryConfig

MEMORY_STATE_KIND = "infini-memory-state"
LM_KIND = "infini-lm"
# The state keys of each kind, named as the seed names them.
STATE_KEYS = {
    "infini": ("memories", "memory_norms", "current_bank", "segment_counter"),
    "multi_memory": ("memories", "memory_norms", "current_memory_idx", "segment_counter"),
    "hierarchical": ("fine_memories", "fine_memory_norms", "current_memory_idx",
                     "segment_counter"),
}


@dataclass(frozen=True)
class LMConfig:
    kind: str = "pythia"
    vocab_size: int = 49152  # the tokenizer's
    shortlist: int = 0  # softmax classes: 0 = the whole vocabulary, else K frequent + "other"
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    max_length: int = 64  # positions per segment (RoPE tables)
    rotary_pct: float = 0.25  # share of each head's dimensions RoPE rotates (NeoX's default)
    rope_base: float = 10000.0
    use_delta_rule: bool = True
    num_memory_banks: int = 1
    segments_per_bank: int = 4
    use_alibi: bool = False
    alibi_scale: float = 1.0
    num_memories: int = 4
    memory_gradient: str = "sequence"  # none | sequence (see newllm.infini.memory)

    def __post_init__(self) -> None:
        if self.kind not in LM_KINDS:
            raise NewllmError(f"model kind '{self.kind}' is unknown; known kinds: "
                              f"{', '.join(LM_KINDS)}.")
        if self.memory_gradient not in MEMORY_GRADIENTS:
            raise NewllmError(f"memory_gradient '{self.memory_gradient}' is unknown; known: "
                              f"{', '.join(MEMORY_GRADIENTS)}.")
        if self.d_model % self.n_heads:
            raise NewllmError(f"d_model ({self.d_model}) must be a multiple of n_heads "
                              f"({self.n_heads}).")

    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(self.d_model, self.n_heads, self.kind, self.use_delta_rule,
                            self.num_memory_banks, self.segments_per_bank, self.use_alibi,
                            self.alibi_scale, self.num_memories,
                            memory_gradient=self.memory_gradient)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with RoPE on the first rotary_pct of each head."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.rot = max(2, int(self.head_dim * config.rotary_pct) // 2 * 2)
        inv_freq = 1.0 / config.rope_base ** (torch.arange(0, self.rot, 2).float() / self.rot)
        angles = torch.outer(torch.arange(config.max_length).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-2]
        r, rest = x[..., :self.rot], x[..., self.rot:]
        r = r * self.cos[:t] + rotate_half(r) * self.sin[:t]
        return torch.cat((r, rest), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """NeoX parallel residual: h + Attn(LN₁ h) + MLP(LN₂ h); Attn may be memory-only."""

    def __init__(self, config: LMConfig, memory: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.attn: nn.Module = (MemoryAttention(config.memory_config()) if memory
                                else CausalSelfAttention(config))
        self.mlp = nn.Sequential(nn.Linear(config.d_model, config.d_ff), nn.GELU(),
                                 nn.Linear(config.d_ff, config.d_model))

    def forward(self, h: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        if isinstance(self.attn, MemoryAttention):
            a = self.attn(self.ln1(h), update_memory=update_memory)
        else:
            a = self.attn(self.ln1(h))
        return h + a + self.mlp(self.ln2(h))


class SegmentLM(nn.Module):
    """Any kind of the factory; reads one segment per call (see the module docstring)."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        classes = config.shortlist + 1 if config.shortlist else config.vocab_size
        self.embed = nn.Embedding(classes, config.d_model)
        # full id -> class (the shortlist's index, or `shortlist` = "other") and
        # log p(token | other); identity and 0 without a shortlist. Set by set_vocabulary().
        self.register_buffer("to_class", torch.arange(config.vocab_size).clamp_max(classes - 1))
        self.register_buffer("tail_logprob", torch.zeros(config.vocab_size))
        self.blocks = nn.ModuleList(Block(config, memory=(i == 0 and config.kind != "pythia"))
                                    for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def memory(self) -> MemoryAttention | None:
        attn = self.blocks[0].attn
        return attn if isinstance(attn, MemoryAttention) else None

    @torch.no_grad()
    def set_vocabulary(self, short_ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Shortlist `short_ids` [K] (full ids); the other tokens share the class "other",
        within which a token's probability is its add-one-smoothed training count share:
        p(t) = p(other) · (c_t + 1) / Σ_{u ∉ shortlist} (c_u + 1), a proper distribution
        over the whole vocabulary, so PPL stays comparable with any model of this tokenizer.
        """
        k = self.config.shortlist
        if len(short_ids) != k or len(set(short_ids.tolist())) != k:
            raise ValueError(f"expected {k} distinct shortlist ids, got {len(short_ids)}")
        to_class = torch.full((self.config.vocab_size,), k, dtype=torch.long)
        to_class[short_ids] = torch.arange(k)
        tail = to_class == k
        smoothed = counts.double() + 1.0
        logprob = torch.where(tail, smoothed.log() - smoothed[tail].sum().log(), 0.0)
        self.to_class.copy_(to_class.to(self.to_class.device))
        self.tail_logprob.copy_(logprob.float().to(self.tail_logprob.device))

    def token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) over the whole vocabulary: logits [..., C] (forward's), targets [...]
        full ids."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(-1, self.to_class[targets].unsqueeze(-1)).squeeze(-1)
        return picked + self.tail_logprob[targets]

    def full_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [..., vocab_size] of every token of the tokenizer."""
        return torch.log_softmax(logits.float(), dim=-1)[..., self.to_class] + self.tail_logprob

    def embed_segment(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] full ids (T <= max_length) -> embeddings [B, T, d]."""
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"a segment of {input_ids.shape[1]} tokens is longer than "
                             f"max_length {self.config.max_length}")
        return self.embed(self.to_class[input_ids])

    def hidden(self, input_ids: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        h = self.embed_segment(input_ids)
        for block in self.blocks:
            h = block(h, update_memory=update_memory)
        return self.ln_f(h)

    def forward(self, input_ids: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        """input_ids [B, T] full ids (one segment) -> logits [B, T, C] over the softmax
        classes (head tied to the embedding; see token_logprobs / full_logprobs)."""
        return self.hidden(input_ids, update_memory) @ self.embed.weight.T

    @torch.no_grad()
    def write_memory(self, input_ids: torch.Tensor) -> None:
        """Write one segment [B, T] into the memory exactly as forward() does, running only
        what the memory reads: the embedding and block 0's memory layer (the later blocks
        and the head cannot change it). Nothing to do for pythia, which has no memory."""
        memory = self.memory
        if memory is not None:
            memory(self.blocks[0].ln1(self.embed_segment(input_ids)), update_memory=True)

    # --- memory API -------------------------------------------------------------------------
    def reset_memory(self) -> None:
        if self.memory is not None:
            self.memory.reset_memory()

    def get_memory_state(self) -> dict[str, torch.Tensor]:
        """Every memory and normalizer, the current bank / memory index, the segment counter
        (an empty dict for pythia, which has no memory; empty memories come back as zeros)."""
        mem = self.memory
        if mem is None:
            return {}
        keys = STATE_KEYS[self.config.kind]
        memories, norms = mem.memories, mem.memory_norms
        if memories is None:
            memories, norms = mem._empty(1, self.embed.weight)
        return {keys[0]: memories.detach().clone(), keys[1]: norms.detach().clone(),
                keys[2]: torch.tensor(mem.current), keys[3]: torch.tensor(mem.segment_counter)}

    def expected_state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        c = self.config.memory_config()
        keys = STATE_KEYS[self.config.kind]
        return {keys[0]: (c.slots, batch, c.n_heads, c.head_dim, c.head_dim),
                keys[1]: (c.slots, batch, c.n_heads, c.head_dim), keys[2]: (), keys[3]: ()}

    def set_memory_state(self, state: dict[str, torch.Tensor], source: str = "memory state"
                         ) -> None:
        """Load a state from get_memory_state(); another kind or shape is a NewllmError."""
        mem = self.memory
        if mem is None:
            raise NewllmError(f"{source}: a {self.config.kind} model has no memory to load.")
        keys = STATE_KEYS[self.config.kind]
        if set(state) != set(keys):
            raise NewllmError(f"{source} holds {sorted(state)}, expected the {self.config.kind} "
                              f"state keys {sorted(keys)}.")
        batch = state[keys[0]].shape[1] if state[keys[0]].dim() == 5 else -1
        for key, shape in self.expected_state_shapes(batch).items():
            if tuple(state[key].shape) != shape:
                raise NewllmError(f"{source}: '{key}' has shape {list(state[key].shape)} but "
                                  f"this model needs {list(shape)} (slots, batch, heads, "
                                  "head_dim...); it was saved from a model of another shape.")
        current, counter = int(state[keys[2]]), int(state[keys[3]])
        if not 0 <= current < self.config.memory_config().slots or counter < 0:
            raise NewllmError(f"{source}: '{keys[2]}' ({current}) or '{keys[3]}' ({counter}) "
                              "is out of range for this model.")
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        mem.memories = state[keys[0]].to(device, dtype).clone()
        mem.memory_norms = state[keys[1]].to(device, dtype).clone()
        mem.current, mem.segment_counter = current, counter

    def save_memory_state(self, path: str | Path) -> str:
        """Write the memory state as safetensors (config + content hash); returns the hash."""
        state = self.get_memory_state()
        if not state:
            raise NewllmError("a pythia model has no memory to save.")
        digest = state_hash(state)
        save_artifact(path, state, kind=MEMORY_STATE_KIND, stage="memory-state",
                      params={"model_config": asdict(self.config)},
                      extra={"content_hash": digest})
        return digest

    def load_memory_state(self, path: str | Path) -> None:
        artifact = load_artifact(path, kind=MEMORY_STATE_KIND)
        saved = artifact.meta["params"]["model_config"]
        digest = state_hash(artifact.tensors)
        if digest != artifact.meta["extra"].get("content_hash"):
            raise NewllmError(f"{path}: the memory's content hash does not match its metadata; "
                              "the file is damaged.")
        mine = asdict(self.config)
        differ = [k for k in mine if k in MEMORY_SHAPE_KEYS and saved.get(k) != mine[k]]
        if differ:
            raise NewllmError(f"{path} was saved from a model with "
                              + ", ".join(f"{k}={saved.get(k)}" for k in differ)
                              + " but this model has "
                              + ", ".join(f"{k}={mine[k]}" for k in differ) + ".")
        self.set_memory_state(artifact.tensors, source=str(path))


# The config fields that decide what a memory state means; a state moves only between
# models that agree on all of them.
MEMORY_SHAPE_KEYS = ("kind", "d_model", "n_heads", "num_memory_banks", "segments_per_bank",
                     "num_memories", "use_delta_rule", "use_alibi", "alibi_scale")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def create_model(kind: str, config: LMConfig | None = None, **options: Any) -> SegmentLM:
    """A freshly initialised model of `kind`; `options` override fields of `config`
    (`create_model("infini", use_alibi=True)`, `create_model("multi_memory", num_memories=8)`).
    """
    known = {f.name for f in fields(LMConfig)} - {"kind"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise NewllmError(f"create_model: unknown option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}.")
    base = asdict(config) if config is not None else {}
    return SegmentLM(LMConfig(**{**base, **options, "kind": kind}))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
