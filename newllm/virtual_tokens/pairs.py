"""Hidden state / token embedding pairs (seeds/002 §2).

For a vocabulary id t, the base model reads `[sep, t]`, t at the start of a
document after the document separator (`base.separator_token`; or `[t]` alone);
X is the hidden state at the chosen layer at t's position and Y is t's row of
the input embedding matrix. Special and added tokens (BOS, EOS, chat markers)
are skipped: they are not text, and a separator followed by a separator is not a
context the model ever sees. Their ids are recorded in the artifact's metadata.

A pairs artifact lives at `<out_dir>/layer<L>/pairs.safetensors`, L being the
resolved (non-negative) layer, so `-1` and the last layer name the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from newllm.core.artifacts import Artifact, load_artifact
from newllm.core.errors import NewllmError
from newllm.core.hidden import hidden_states_at
from newllm.core.runtime import progress
from newllm.virtual_tokens import run_name

PAIRS_KIND = "hidden-embedding-pairs"
PAIRS_FILE = "pairs.safetensors"


def pairs_dir(out_dir: str | Path, layer: int) -> Path:
    """The folder holding the pairs of hidden-state index `layer` (non-negative)."""
    return Path(out_dir) / run_name(layer)


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of special and added tokens (never text), sorted."""
    ids = set(tokenizer.all_special_ids)
    ids |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return sorted(i for i in ids if i is not None)


def ordinary_token_ids(tokenizer: Any, embedding_rows: int,
                       max_tokens: int | None) -> tuple[torch.Tensor, list[int]]:
    """The first `max_tokens` ids (all if None) that are not special/added tokens.

    Returns the ids [N] and all special ids of the vocabulary (never extracted).
    Ids beyond the tokenizer's vocabulary (padding rows of the embedding) are never used.
    """
    special = set(special_token_ids(tokenizer))
    usable = min(len(tokenizer), embedding_rows)
    ids = [i for i in range(usable) if i not in special]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.int64), sorted(i for i in special if i < usable)


@torch.inference_mode()
def extract_hidden(model: torch.nn.Module, token_ids: torch.Tensor, layer_index: int,
                   prefix_id: int | None, batch_size: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """X [N, d]: the hidden state at `layer_index` of each token, read after `prefix_id` if
    given.

    Every sequence has the same length (1 or 2), so batches need no padding. X is float32
    (float64 for a float64 model, so exactness checks are not rounded away).
    """
    chunks = []
    starts = range(0, len(token_ids), batch_size)
    for start in progress(starts, desc="extract-pairs", total=len(starts), unit="batch"):
        tokens = token_ids[start:start + batch_size].to(device)[:, None]
        if prefix_id is not None:
            tokens = torch.cat([torch.full_like(tokens, prefix_id), tokens], dim=1)
        mask = torch.ones_like(tokens)
        hidden = hidden_states_at(model, tokens, mask, layer_index,
                                  key="extract_pairs.hidden_index")
        chunks.append(hidden[:, -1].to(torch.promote_types(hidden.dtype, torch.float32)).cpu())
    return torch.cat(chunks)


def embedding_rows(model: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """Y [N, d] (float32): the tokens' rows of the input embedding matrix."""
    weight = model.get_input_embeddings().weight
    return weight.detach()[token_ids.to(weight.device)].float().cpu()


@dataclass(frozen=True)
class Pairs:
    """A loaded pairs artifact."""

    x: torch.Tensor  # [N, d] float32
    y: torch.Tensor  # [N, d] float32
    token_ids: torch.Tensor  # [N] int64
    layer: int  # resolved hidden-states index
    prefix_id: int | None  # the token read before each token (None: read alone)
    artifact: Artifact


def load_pairs(path: str | Path, base: dict[str, Any]) -> Pairs:
    """Read a pairs artifact made from `base` (kind and weights hash are checked)."""
    artifact = load_artifact(path, kind=PAIRS_KIND, base=base)
    extra = artifact.meta["extra"]
    x, y, ids = artifact["X"], artifact["Y"], artifact["token_ids"]
    if len(ids) == 0 or x.shape != y.shape or len(ids) != len(x):
        raise NewllmError(f"{path}: expected X and Y of the same shape [N, d] and token_ids "
                          f"[N] with N > 0, got {list(x.shape)}, {list(y.shape)}, "
                          f"{list(ids.shape)}; re-run extract-pairs.")
    return Pairs(x, y, ids, int(extra["layer_index"]), extra["prefix_token_id"], artifact)
