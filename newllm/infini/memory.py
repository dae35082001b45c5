"""Memory-only Infini-attention (Munkhdalai et al. 2024) and its multi-memory variants.

A sequence is read in segments. Per head h, the layer keeps a compressive memory
M ∈ R^{d_k×d_v} and a normalizer z ∈ R^{d_k}, both zero at the start. With
σ(x) = ELU(x) + 1 (positive, so every normalizer is >= 0) and Q, K, V the segment's
projections (no positional encoding: NoPE), each token of segment s reads only the
memory left by segments 0..s-1 (never its own segment, so the layer stays causal):

    retrieval   A = σ(Q) M / (σ(Q) z)                 (0 while the memory is empty)
    update      M ← M + σ(K)ᵀ V                       (linear)
                M ← M + σ(K)ᵀ (V − σ(K) M / (σ(K) z))  (delta rule, `use_delta_rule`)
                z ← z + Σ_t σ(K_t)

What gradients cross segments (`memory_gradient`):
- `sequence` (the default): M and z keep their graph across the segments of one training
  sequence, so a later segment's loss reaches σ(K) and V of the segments written before it
  (truncated back-propagation through the sequence): the memory learns what to store.
  `reset_memory()` at each sequence's start drops the graph, so nothing crosses a sequence
  boundary and the seed's "second backward" error (a graph kept across batches) cannot occur.
- `none` (the seed's): M and z are written under no_grad and detached; σ(K) and V of a
  memory-only layer then never get a gradient and stay random projections.

Variants, all with the same projections (so parameter counts match):
- banks (`num_memory_banks` N, `segments_per_bank` P): N memories; segment s writes to
  bank ⌊s/P⌋ mod N (a bank wraps around and keeps accumulating); the retrieval is the
  mean of the non-empty banks' retrievals.
- ALiBi over segments (`use_alibi`, `alibi_scale` c): before each update every memory and
  normalizer is multiplied by exp(−m_h), m_h = c·2^(−8(h+1)/H) (ALiBi's head slopes), so
  the segment written d segments before the latest one weighs w = exp(−m_h·d):
  M = Σ_i w_i σ(K_i)ᵀ V_i, z = Σ_i w_i σ(K_i) (linear form).
- multi_memory (`num_memories` N): segment s writes to memory s mod N; the retrieval mixes
  the N memories' retrievals A_i by attention, weights softmax_i(Q·k̄_i / √d_k) with the
  memory's key profile k̄_i = d_k·z_i / Σ z_i (empty memories are left out).
- hierarchical (`num_memories` N fine memories, written as multi_memory): the coarse memory
  is the sum of the fine ones (ΣM_i, Σz_i); a learned gate g = sigmoid(w·Q + b) per token
  and head decides how far to expand to the fine level: A = (1−g)·A_coarse + g·A_fine-mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MEMORY_MODES = ("infini", "multi_memory", "hierarchical")
MEMORY_GRADIENTS = ("none", "sequence")  # see the module docstring


def sigma(x: torch.Tensor) -> torch.Tensor:
    """The positive feature map of linear attention: ELU(x) + 1."""
    return F.elu(x) + 1.0


def retrieve(sq: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
             eps: float = 1e-6) -> torch.Tensor:
    """σ(Q) M / (σ(Q) z): sq [..., L, d_k], memory [..., d_k, d_v], norm [..., d_k]."""
    numerator = sq @ memory
    denominator = (sq * norm.unsqueeze(-2)).sum(-1, keepdim=True)
    return numerator / denominator.clamp_min(eps)  # an empty memory (0, 0) retrieves 0


def update(sk: torch.Tensor, v: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
           delta_rule: bool, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory and normalizer after writing one segment (σ(K) [..., L, d_k], V [..., L, d_v])."""
    if delta_rule:
        v = v - retrieve(sk, memory, norm, eps)  # store only what the memory does not hold
    return memory + sk.transpose(-1, -2) @ v, norm + sk.sum(-2)


def alibi_slopes(n_heads: int, scale: float) -> torch.Tensor:
    """ALiBi's per-head slopes 2^(−8(h+1)/H), times `scale`."""
    return scale * torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


@dataclass(frozen=True)
class MemoryConfig:
    d_model: int
    n_heads: int
    mode: str = "infini"  # infini | multi_memory | hierarchical
    use_delta_rule: bool = True
    num_memory_banks: int = 1  # infini
    segments_per_bank: int = 4  # infini
    use_alibi: bool = False
    alibi_scale: float = 1.0
    num_memories: int = 4  # multi_memory, hierarchical
    memory_gradient: str = "sequence"  # none | sequence
    eps: float = 1e-6

    @property
    def slots(self) -> int:
        """How many (M, z) pairs the layer holds."""
        return self.num_memory_banks if self.mode == "infini" else self.num_memories

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class MemoryAttention(nn.Module):
    """x [B, T, d] (one segment) -> memory read-out [B, T, d]; writes the segment after reading.

    State: `memories` [S, B, H, d_k, d_v], `memory_norms` [S, B, H, d_k] (S slots: banks or
    memories), `current` (the bank / memory the next segment writes), `segment_counter`.
    """

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__()
        if config.mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {config.mode!r}")
        if config.memory_gradient not in MEMORY_GRADIENTS:
            raise ValueError(f"memory_gradient must be one of {MEMORY_GRADIENTS}, got "
                             f"{config.memory_gradient!r}")
        self.config = config
        d = config.d_model
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        if config.mode == "hierarchical":
            self.gate = nn.Linear(config.head_dim, 1)  # the coarse-to-fine expansion gate
        self.register_buffer("slopes", alibi_slopes(config.n_heads, config.alibi_scale),
                             persistent=False)
        self.reset_memory()

    def reset_memory(self) -> None:
        self.memories: torch.Tensor | None = None
        self.memory_norms: torch.Tensor | None = None
        self.current = 0
        self.segment_counter = 0

    def _empty(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.slots, batch, c.n_heads, c.head_dim)
        return (torch.zeros(*shape, c.head_dim, dtype=like.dtype, device=like.device),
                torch.zeros(*shape, dtype=like.dtype, device=like.device))

    def _read(self, q: torch.Tensor, memories: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """q [B, H, L, d_k] raw queries -> read-out [B, H, L, d_v]."""
        c = self.config
        sq = sigma(q)
        per_slot = retrieve(sq.unsqueeze(0), memories, norms, c.eps)  # [S, B, H, L, d_v]
        filled = norms.sum(-1) > 0  # [S, B, H]
        if c.mode == "infini":  # mean over the banks written so far
            weights = filled.to(q.dtype) / filled.sum(0).clamp_min(1).to(q.dtype)
            return (weights[..., None, None] * per_slot).sum(0)
        profile = c.head_dim * norms / norms.sum(-1, keepdim=True).clamp_min(c.eps)
        scores = torch.einsum("bhld,sbhd->sbhl", q, profile) / math.sqrt(c.head_dim)
        scores = scores.masked_fill(~filled[..., None], float("-inf"))
        weights = torch.softmax(scores, dim=0).nan_to_num(0.0)  # all empty -> 0
        fine = (weights[..., None] * per_slot).sum(0)
        if c.mode == "multi_memory":
            return fine
        coarse = retrieve(sq, memories.sum(0), norms.sum(0), c.eps)
        g = torch.sigmoid(self.gate(q))  # [B, H, L, 1]
        return (1 - g) * coarse + g * fine

    def forward(self, x: torch.Tensor, update_memory: bool = True) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        if self.memories is None:
            self.memories, self.memory_norms = self._empty(b, x)
        elif self.memories.shape[1] != b:
            raise ValueError(f"the memory holds {self.memories.shape[1]} sequences but the "
                             f"batch has {b}; call reset_memory() between batches")
        read = self._read(q, self.memories, self.memory_norms)
        if update_memory:
            self._write(k, v)
        return self.out(read.transpose(1, 2).reshape(b, t, c.d_model))

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one segment to the current slot; with memory_gradient none, detached."""
        if self.config.memory_gradient == "none":
            with torch.no_grad():
                memories, norms = self._written(k, v)
            memories, norms = memories.detach(), norms.detach()
        else:
            memories, norms = self._written(k, v)
        self.memories, self.memory_norms = memories, norms
        c = self.config
        self.segment_counter += 1
        if c.mode == "infini":
            if self.segment_counter % c.segments_per_bank == 0:
                self.current = (self.current + 1) % c.num_memory_banks
        else:
            self.current = (self.current + 1) % c.num_memories

    def _written(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's (M, z) after writing the segment to the current slot (new tensors)."""
        c = self.config
        memories, norms = self.memories, self.memory_norms
        if c.use_alibi:  # older segments fade: every slot decays by exp(-slope) per segment
            decay = torch.exp(-self.slopes).to(memories.dtype)
            memories = memories * decay[:, None, None]
            norms = norms * decay[:, None]
        slot = self.current
        memory, norm = update(sigma(k), v, memories[slot], norms[slot], c.use_delta_rule, c.eps)
        keep = torch.arange(c.slots, device=memories.device) != slot  # [S]
        memories = torch.where(keep[:, None, None, None, None], memories, memory.unsqueeze(0))
        norms = torch.where(keep[:, None, None, None], norms, norm.unsqueeze(0))
        return memories, norms
