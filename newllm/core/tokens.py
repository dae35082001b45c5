"""Which special token plays which role: the document separator, BOS, padding.

Chat models name their turn markers BOS/EOS (SmolLM2-Instruct: BOS `<|im_start|>`,
EOS `<|im_end|>`), but their pretraining documents were separated by another token
(`<|endoftext|>`). Text that stands for "the start of a document" must follow that one,
so `base.separator_token: auto` prefers a document-boundary token of the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from newllm.core.errors import NewllmError

# Document-boundary tokens of common pretraining setups (GPT-2/SmolLM/Qwen, Llama 3).
DOCUMENT_BOUNDARY_TOKENS = ("<|endoftext|>", "<|end_of_text|>")


def first_token_id(*candidates: int | None) -> int | None:
    """The first candidate id that is set (0 is a valid id)."""
    return next((int(c) for c in candidates if c is not None), None)


def separator_token_id(tokenizer: Any, name: str = "auto",
                       key: str = "base.separator_token") -> int:
    """The id of the document separator: `name`, or for `auto` the model's document boundary
    (a known boundary token of the vocabulary, else BOS, else EOS)."""
    vocab = tokenizer.get_vocab()
    if name != "auto":
        if name not in vocab:
            raise NewllmError(f"{key} '{name}' is not a token of the base tokenizer's "
                              "vocabulary; give one token string or 'auto'.")
        return int(vocab[name])
    found = first_token_id(*(vocab.get(t) for t in DOCUMENT_BOUNDARY_TOKENS),
                           tokenizer.bos_token_id, tokenizer.eos_token_id)
    if found is None:
        raise NewllmError(f"{key} is 'auto' but the base tokenizer has no document-boundary, "
                          "BOS or EOS token; name one of its tokens.")
    return found


def pad_token_id(tokenizer: Any, model: Any) -> int:
    """A pad id for batching: the tokenizer's, else EOS, else the config's, else 0 (padding is
    masked out or sits after every scored position, so its value never matters)."""
    found = first_token_id(tokenizer.pad_token_id, tokenizer.eos_token_id,
                           getattr(model.config, "pad_token_id", None))
    return 0 if found is None else found


def left_pad(rows: Sequence[Sequence[int]] | Sequence[torch.Tensor], pad: int | torch.Tensor,
             device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of different lengths left-padded into one batch, for generation and scoring.

    Token ids (`rows` lists of ids, `pad` an id) give ids [B, T] on `device`; embeddings
    (`rows` tensors [T_i, d], `pad` a vector [d]) give [B, T, d] where the rows are. With
    them the attention mask [B, T] (0 on the padding, int64) and the position ids [B, T],
    counted from each row's first real token (0 on the padding).
    """
    length = max(len(r) for r in rows)
    if isinstance(pad, torch.Tensor):
        padded = torch.stack([torch.cat([pad.expand(length - len(r), -1).to(r.dtype), r])
                              for r in rows])  # type: ignore[union-attr]
    else:
        padded = torch.tensor([[pad] * (length - len(r)) + list(r) for r in rows],
                              device=device)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows],
                        device=padded.device)
    return padded, mask, (mask.cumsum(1) - 1).clamp_min(0)
