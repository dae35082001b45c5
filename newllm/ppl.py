"""Sliding-window perplexity, batched, with pluggable model kinds.

The evaluated stream is `[sep, doc_1, sep, doc_2, ...]`: documents back to back,
each preceded by a separator token that is context only. Every document token
(target position >= 1) is scored exactly once. The first window scores all its
targets; each later window moves `stride` targets on and scores only those,
with the `context_length - stride` tokens before them as context. A window's
inputs are `x[begin:end]` (at most `context_length` tokens) and they predict
`x[begin+1:end+1]`, so even `stride == context_length` scores every token.

Figures follow lm-evaluation-harness: token PPL = exp(NLL / tokens), word PPL =
exp(NLL / words), bits per byte = NLL / (bytes * ln 2), all over whole documents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from newllm.base import BaseInfo, BaseModel
from newllm.data import count_bytes, count_words
from newllm.errors import NewllmError
from newllm.runtime import progress


class Scorer(Protocol):
    """What eval-ppl needs of a model: logits for the last `keep` positions of each row."""

    device: torch.device
    info: BaseInfo  # the base whose tokenizer the model reads
    separator_id: int

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, keep, V] for positions T-keep .. T-1."""
        ...


MODEL_KINDS: dict[str, Callable[..., Scorer]] = {}


def register_model_kind(name: str) -> Callable:
    """Decorator: `loader(base_params) -> Scorer` becomes eval-ppl's `model_kind: name`."""

    def decorate(loader: Callable[..., Scorer]) -> Callable[..., Scorer]:
        MODEL_KINDS[name] = loader
        return loader

    return decorate


@dataclass
class HFScorer:
    """A Hugging Face causal LM; computes the LM head only where logits are needed."""

    model: torch.nn.Module
    device: torch.device
    info: BaseInfo
    separator_id: int

    @classmethod
    def from_base(cls, base: BaseModel) -> HFScorer:
        return cls(base.model, base.device, base.info, separator_token_id(base.tokenizer))

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return self.model(input_ids=input_ids, logits_to_keep=keep, use_cache=False).logits


@register_model_kind("hf")
def load_hf_scorer(base_params: Any) -> HFScorer:
    return HFScorer.from_base(base_params.load())


def build_stream(docs: list[torch.Tensor], separator_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents joined as [sep, d1, sep, d2, ...] and the mask of positions to score."""
    pieces, mask = [], []
    for doc in docs:
        pieces += [torch.tensor([separator_id]), doc.long()]
        mask += [torch.zeros(1, dtype=torch.bool), torch.ones(len(doc), dtype=torch.bool)]
    return torch.cat(pieces), torch.cat(mask)


def window_spans(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: inputs x[begin:end] score their last n_scored targets."""
    spans = []
    scored_upto = 0  # targets 1..scored_upto are done
    while scored_upto < n_tokens - 1:
        step = context_length if not spans else stride
        end = min(scored_upto + step, n_tokens - 1)
        spans.append((max(0, end - context_length), end, end - scored_upto))
        scored_upto = end
    return spans


@dataclass(frozen=True)
class PplResult:
    nll: float  # summed negative log-likelihood, nats
    tokens: int
    words: int
    bytes: int
    windows: int
    context_length: int
    stride: int

    @property
    def token_ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_ppl(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))


def _check_sizes(n_tokens: int, context_length: int, stride: int) -> None:
    if n_tokens < 2:
        raise NewllmError("the evaluated text has fewer than 2 tokens; nothing to score.")
    if stride > context_length:
        raise NewllmError(f"eval_ppl.stride ({stride}) must be <= eval_ppl.context_length "
                          f"({context_length}), or some tokens would never be scored.")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmax; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.inference_mode()
def sliding_window_nll(scorer: Scorer, stream: torch.Tensor, score_mask: torch.Tensor,
                       context_length: int, stride: int, batch_size: int) -> tuple[float, int, int]:
    """Batched sliding-window NLL over `stream` [N]; returns (nll, scored tokens, windows)."""
    _check_sizes(len(stream), context_length, stride)
    spans = window_spans(len(stream), context_length, stride)
    nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    batches = [spans[i:i + batch_size] for i in range(0, len(spans), batch_size)]
    for batch in progress(batches, desc="eval-ppl", unit="batch"):
        # Windows in a batch have equal length, except a lone window shorter than the context.
        inputs = torch.stack([stream[b:e] for b, e, _ in batch]).to(scorer.device)  # [B, T]
        keep = max(n for _, _, n in batch)
        labels = torch.full((len(batch), keep), -100, dtype=torch.long)
        for row, (_, end, n) in enumerate(batch):
            targets = stream[end + 1 - n:end + 1]
            labels[row, keep - n:] = torch.where(score_mask[end + 1 - n:end + 1], targets, -100)
        logits = _upcast(scorer.logits(inputs, keep))  # [B, keep, V]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 labels.reshape(-1).to(logits.device), reduction="sum")
        if not torch.isfinite(losses):
            raise NewllmError("eval-ppl: the model produced a non-finite loss (NaN/inf); "
                              "try base.dtype float32.")
        nll += losses.double().cpu()
        scored += int((labels != -100).sum())
    return float(nll), scored, len(spans)


@torch.inference_mode()
def naive_sliding_window_nll(scorer: Scorer, stream: torch.Tensor, score_mask: torch.Tensor,
                             context_length: int, stride: int) -> tuple[float, int, int]:
    """The plain reference: one window at a time, full logits, target by target bookkeeping."""
    _check_sizes(len(stream), context_length, stride)
    nll, scored, windows = 0.0, 0, 0
    first_target = 1
    while first_target < len(stream):
        step = context_length if windows == 0 else stride
        last_target = min(first_target - 1 + step, len(stream) - 1)
        begin = max(0, last_target - context_length)
        window = stream[begin:last_target].to(scorer.device)
        log_probs = torch.log_softmax(_upcast(scorer.logits(window[None], len(window))[0]), -1)
        for target in range(first_target, last_target + 1):
            if score_mask[target]:
                nll -= float(log_probs[target - 1 - begin, stream[target]])
                scored += 1
        windows += 1
        first_target = last_target + 1
    return nll, scored, windows


def evaluate_ppl(scorer: Scorer, docs: list[torch.Tensor], texts: list[str], separator_id: int,
                 context_length: int, stride: int, batch_size: int,
                 naive: bool = False) -> PplResult:
    """Token PPL, word PPL and bits per byte of whole documents `docs` (with raw `texts`)."""
    stream, mask = build_stream(docs, separator_id)
    if naive:
        nll, tokens, windows = naive_sliding_window_nll(scorer, stream, mask, context_length,
                                                        stride)
    else:
        nll, tokens, windows = sliding_window_nll(scorer, stream, mask, context_length, stride,
                                                  batch_size)
    return PplResult(nll, tokens, sum(count_words(t) for t in texts),
                     sum(count_bytes(t) for t in texts), windows, context_length, stride)


def separator_token_id(tokenizer: Any) -> int:
    """The document separator: EOS (else BOS); evaluation needs one of them."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise NewllmError("the base tokenizer has neither an EOS nor a BOS token to separate "
                      "documents with.")
