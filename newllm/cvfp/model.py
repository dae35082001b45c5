"""The CVFP language model (seeds/001, seeds/003): frozen context blocks, a trained token block.

A ContextBlock reads the stream one token at a time and carries a context vector:

    c_t = ContextBlock(c_{t-1}, e_t),   each of its layers:  c <- c + ReLU(W [c, e_t] + b)

`num_blocks` blocks, each with its own `context_dim`-wide context, run side by side (the
seeds' cascade: their contexts are concatenated, never fed into each other). Phase 1 trains
the blocks (phase1.py); phase 2 freezes them and trains the TokenBlock to predict token t+1
from the contexts after token t and the embedding of token t:

    x <- e_t;   each TokenBlock layer i:  x <- x + ReLU(W_i [C_i, x] + b_i)
    logits = (g * LayerNorm(x) + h) @ E^T      (the head tied to the input embeddings)

where C_i is the concatenation over blocks of ContextBlock layer i's output (the E-variant
of seeds/001: TokenBlock layer i reads ContextBlock layer i, so both have the same number
of layers; with one layer each, C_1 is simply every block's context).

`context_norm: layernorm` (the default) normalizes every context layer's output,
c <- LayerNorm(c + ReLU(W [c, e] + b)) without learned scale or shift; `none` is the
formula as the seeds write it, whose contexts can only grow (see ContextLayer). The state
before the norm, s = c + ReLU(W [c, e] + b), is what phase 1's `*_prenorm` diversity
objectives read (`ContextLayer.pre_norm`): after the norm every row has norm sqrt(d), so
the seeds' OACD can only see the batch mean there. The effective ranks each setting
reaches are measured figures, in docs/cvfp.md and metrics/cvfp/phase1.json.

Token embeddings are the base model's input-embedding rows E[v], frozen, and normalized
before the blocks read them: e = LayerNorm(E[v]) without learned scale or shift (zero mean,
unit variance per row, as the seeds' `embed_norm`). The head multiplies by the raw rows E
after a final LayerNorm with a learned gain g and shift h (GPT-2's ln_f before its tied
head; part of the TokenBlock). Why it is needed: x starts as e_t, whose dot product with
its own row E[t] is about 77 on SmolLM2's embeddings, so without it every prediction starts
as "repeat the current token" with near certainty, and ReLU residuals can only add
non-negative vectors, never take that back (measured: val PPL 2.6e9 after 20k tokens). g
starts at 0.1 for the same reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from newllm.core.errors import NewllmError

HEADS = ("tied_frozen", "trainable")
CONTEXT_NORMS = ("layernorm", "none")


@dataclass(frozen=True)
class CVFPConfig:
    vocab_size: int
    embed_dim: int
    num_blocks: int = 2
    context_layers: int = 1
    token_layers: int = 1
    context_dim: int = 500  # per block
    context_norm: str = "layernorm"  # layernorm | none
    head: str = "tied_frozen"  # tied_frozen: logits use E itself | trainable: an untied copy
    freeze_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.context_norm not in CONTEXT_NORMS:
            raise NewllmError(f"phase1_context.context_norm must be one of "
                              f"{', '.join(CONTEXT_NORMS)}, got {self.context_norm!r}.")
        if self.context_layers != self.token_layers:
            raise NewllmError(
                f"phase1_context.context_layers ({self.context_layers}) must equal "
                f"phase1_context.token_layers ({self.token_layers}): TokenBlock layer i reads "
                "ContextBlock layer i.")
        if self.head == "tied_frozen" and not self.freeze_embeddings:
            raise NewllmError("phase2_token.head tied_frozen ties the head to the frozen "
                              "embeddings; with freeze_embeddings false use head: trainable.")

    @property
    def total_context_dim(self) -> int:
        return self.num_blocks * self.context_dim

    def as_dict(self) -> dict:
        return asdict(self)


def normalize_embeddings(rows: torch.Tensor) -> torch.Tensor:
    """What the blocks read of an embedding row: zero mean, unit variance (no learned affine)."""
    return F.layer_norm(rows, rows.shape[-1:])


class ContextLayer(nn.Module):
    """c' = c + ReLU(W [c, e] + b), then LayerNorm (no affine) if `normalize`.

    Without the norm, ReLU >= 0 makes c' >= c elementwise for any weights: along a stream
    every context coordinate only grows, and stays bounded only where W's context half feeds
    back negatively. With PyTorch's default initialization it does not (contexts overflow
    within a few hundred tokens), so there the context half starts at -I plus that default
    noise: the layer starts close to c' = max(c, W_e e + b), a bounded running maximum.
    """

    def __init__(self, context_dim: int, embed_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.normalize = normalize
        self.linear = nn.Linear(context_dim + embed_dim, context_dim)
        if not normalize:
            with torch.no_grad():
                self.linear.weight[:, :context_dim] -= torch.eye(context_dim)

    def pre_norm(self, context: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """s = c + ReLU(W [c, e] + b), before the (optional) LayerNorm."""
        return context + F.relu(self.linear(torch.cat([context, embedding], dim=-1)))

    def normed(self, state: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(state, state.shape[-1:]) if self.normalize else state

    def forward(self, context: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.normed(self.pre_norm(context, embedding))

    def context_weight(self) -> torch.Tensor:  # W's context half [context_dim, context_dim]
        return self.linear.weight[:, :self.context_dim]

    def embedding_weight(self) -> torch.Tensor:  # W's embedding half [context_dim, embed_dim]
        return self.linear.weight[:, self.context_dim:]


class ContextBlock(nn.Module):
    def __init__(self, context_dim: int, embed_dim: int, num_layers: int,
                 normalize: bool = True) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.normalize = normalize
        self.layers = nn.ModuleList(ContextLayer(context_dim, embed_dim, normalize)
                                    for _ in range(num_layers))
        # Where every stream starts (zeros unless phase 1 inherited another block's context).
        self.register_buffer("initial_context", torch.zeros(context_dim))

    def forward_with_intermediates(self, context: torch.Tensor,
                                   embedding: torch.Tensor) -> list[torch.Tensor]:
        """[.., context_dim] and [.., embed_dim] -> every layer's output; the last is c_t."""
        outputs = []
        for layer in self.layers:
            context = layer(context, embedding)
            outputs.append(context)
        return outputs

    def forward(self, context: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.forward_with_intermediates(context, embedding)[-1]

    def forward_with_pre_norm(self, context: torch.Tensor, embedding: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_t, the last layer's state before its norm), both [.., context_dim]."""
        for layer in self.layers[:-1]:
            context = layer(context, embedding)
        state = self.layers[-1].pre_norm(context, embedding)
        return self.layers[-1].normed(state), state


class TokenLayer(nn.Module):
    """x' = x + ReLU(W [C, x] + b), C the concatenated contexts this layer reads."""

    def __init__(self, context_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(context_dim + embed_dim, embed_dim)

    def forward(self, contexts: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return token + F.relu(self.linear(torch.cat([contexts, token], dim=-1)))


class TokenBlock(nn.Module):
    FINAL_GAIN = 0.1

    def __init__(self, context_dim: int, embed_dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TokenLayer(context_dim, embed_dim)
                                    for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.linear.reset_parameters()
        nn.init.constant_(self.final_norm.weight, self.FINAL_GAIN)
        nn.init.zeros_(self.final_norm.bias)

    def forward_with_contexts(self, contexts: list[torch.Tensor],
                              token: torch.Tensor) -> torch.Tensor:
        """contexts[i] [.., total_context_dim] feeds layer i; token [.., embed_dim]."""
        for layer, context in zip(self.layers, contexts, strict=True):
            token = layer(context, token)
        return self.final_norm(token)


class CVFPLM(nn.Module):
    def __init__(self, config: CVFPConfig, embeddings: torch.Tensor) -> None:
        super().__init__()
        c = config
        if tuple(embeddings.shape) != (c.vocab_size, c.embed_dim):
            raise NewllmError(f"the base's input embeddings are {tuple(embeddings.shape)}, the "
                              f"CVFP model expects ({c.vocab_size}, {c.embed_dim}).")
        self.config = config
        self.embedding = nn.Parameter(embeddings.detach().float().clone(),
                                      requires_grad=not c.freeze_embeddings)
        self.context_blocks = nn.ModuleList(
            ContextBlock(c.context_dim, c.embed_dim, c.context_layers,
                         c.context_norm == "layernorm")
            for _ in range(c.num_blocks))
        self.token_block = TokenBlock(c.total_context_dim, c.embed_dim, c.token_layers)
        self.head = None
        if c.head == "trainable":  # untied, starting from the embeddings
            self.head = nn.Linear(c.embed_dim, c.vocab_size, bias=False)
            self.head.weight.data.copy_(embeddings)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [..] -> normalized embeddings [.., embed_dim]."""
        return normalize_embeddings(F.embedding(token_ids, self.embedding))

    def head_weight(self) -> torch.Tensor:
        """[vocab, embed_dim]: the embeddings themselves (tied) or the untied head's rows."""
        return self.embedding if self.head is None else self.head.weight

    def logits(self, token_out: torch.Tensor) -> torch.Tensor:
        return F.linear(token_out, self.head_weight())

    def initial_contexts(self) -> list[torch.Tensor]:
        return [block.initial_context for block in self.context_blocks]

    def step(self, contexts: list[torch.Tensor], embedding: torch.Tensor
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One token through every block: (each block's new context, per layer the
        concatenation over blocks of that layer's output, as the TokenBlock reads it)."""
        outputs = [block.forward_with_intermediates(context, embedding)
                   for block, context in zip(self.context_blocks, contexts, strict=True)]
        per_layer = [torch.cat([out[i] for out in outputs], dim=-1)
                     for i in range(self.config.context_layers)]
        return [out[-1] for out in outputs], per_layer

    def next_token_logits(self, layer_contexts: list[torch.Tensor],
                          token_ids: torch.Tensor) -> torch.Tensor:
        """Contexts after token t (per layer [.., total_context_dim]) and token t [..] ->
        logits for token t+1 [.., vocab]."""
        return self.logits(self.token_block.forward_with_contexts(layer_contexts,
                                                                  self.embed(token_ids)))

    def trainable_parts(self) -> list[nn.Module | nn.Parameter]:
        """What phase 2 trains: the TokenBlock, plus the head / embeddings if configured."""
        parts: list[nn.Module | nn.Parameter] = [self.token_block]
        if self.head is not None:
            parts.append(self.head)
        if not self.config.freeze_embeddings:
            parts.append(self.embedding)
        return parts
