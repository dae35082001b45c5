"""Sliding-window perplexity, batched, with pluggable model kinds.

Documents are scored in one of two ways (`eval_ppl.documents`):
- `separate` (the default): each document on its own, as `[sep, doc]`, the way
  lm-evaluation-harness's `loglikelihood_rolling` scores a document; the figure
  does not depend on the order of the documents and is comparable with published
  harness word perplexities.
- `stream`: all documents back to back, `[sep, doc_1, sep, doc_2, ...]`; later
  documents are read with the end of earlier ones as context.
The separator token is context only, never scored. Every document token is
scored exactly once. The first window of a stream scores all its targets; each
later window moves `stride` targets on and scores only those, with the
`context_length - stride` tokens before them as context. A window's inputs are
`x[begin:end]` (at most `context_length` tokens) and they predict
`x[begin+1:end+1]`, so even `stride == context_length` scores every token.

A recurrent kind (one whose scorer has `stream_nll`) has no window: it reads each
stream from its first token to its last, carrying its state, and scores the same
tokens; its context length and stride are recorded as not applicable (null).

Figures follow lm-evaluation-harness: token PPL = exp(NLL / tokens), word PPL =
exp(NLL / words), bits per byte = NLL / (bytes * ln 2), all over whole documents.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from newllm.core.base import BaseInfo, BaseModel
from newllm.core.data import count_bytes, count_words
from newllm.core.errors import NewllmError
from newllm.core.runtime import progress
from newllm.core.tokens import separator_token_id


class Scorer(Protocol):
    """What eval-ppl needs of a model: logits for the last `keep` positions of each row.

    A kind may also define `summed_nll(input_ids, keep, labels)`, a faster way to the sum
    `nll_from_logits` computes; eval-ppl uses it when present. A recurrent kind defines
    `stream_nll(ids, mask) -> float`, the summed NLL of the masked tokens of a stream read
    from its first token with the state carried throughout; eval-ppl then uses no windows."""

    device: torch.device
    info: BaseInfo  # the base whose tokenizer the model reads
    separator_id: int
    separator_token: str  # the separator as text, for metrics
    max_length: int | None  # positions the model can read (None: unbounded)

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, keep, V] for positions T-keep .. T-1."""
        ...


def nll_from_logits(scorer: Scorer, input_ids: torch.Tensor, keep: int,
                    labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `labels` [B, keep] (-100 = not scored) from the scorer's logits."""
    logits = _upcast(scorer.logits(input_ids, keep))  # [B, keep, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           labels.reshape(-1).to(logits.device), reduction="sum")


# eval-ppl's (and eval-reversal's) `model_kind`: "module:function" of a scorer loader
# `(base_params, checkpoint) -> Scorer`, imported only when asked for (as cli.COMMANDS), so a
# line of research adds one entry here.
SCORER_KINDS: dict[str, str] = {
    "hf": "newllm.core.ppl:load_hf_scorer",
    "infini-lm": "newllm.infini.training:load_infini_scorer",
    "cvfp": "newllm.cvfp.scorer:load_cvfp_scorer",
}
# Architectures whose logits are exactly lm_head(decoder(x).last_hidden_state).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
HEAD_CHUNK = 512  # scored positions per LM-head call: 512 x 49k float32 logits is 100 MB


def load_scorer(kind: str, base_params: Any, checkpoint: str | None) -> Scorer:
    """The scorer of eval-ppl's `model_kind`, reading `checkpoint` for a trained kind."""
    if kind not in SCORER_KINDS:
        raise NewllmError(f"eval_ppl.model_kind '{kind}' is unknown; known kinds: "
                          f"{', '.join(sorted(SCORER_KINDS))}.")
    module, _, function = SCORER_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), function)(base_params, checkpoint)


@dataclass
class HFScorer:
    """A Hugging Face causal LM; computes the LM head only where logits are needed."""

    model: torch.nn.Module
    device: torch.device
    info: BaseInfo
    separator_id: int
    separator_token: str
    max_length: int | None

    @classmethod
    def from_base(cls, base: BaseModel, separator_token: str = "auto") -> HFScorer:
        separator_id = separator_token_id(base.tokenizer, separator_token)
        return cls(base.model, base.device, base.info, separator_id,
                   base.tokenizer.convert_ids_to_tokens(separator_id),
                   getattr(base.model.config, "max_position_embeddings", None))

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return self.model(input_ids=input_ids, logits_to_keep=keep, use_cache=False).logits

    def summed_nll(self, input_ids: torch.Tensor, keep: int,
                   labels: torch.Tensor) -> torch.Tensor:
        """The NLL of `labels` [B, keep], with the LM head applied only at scored positions
        and a few hundred of them at a time: a batch's full float32 logits (rows x keep x
        vocabulary, gigabytes at long contexts) are never held, and the head skips padding
        and separators. Only architectures whose logits are known to be a plain linear head
        of the decoder's last hidden state take this path; others (soft-capped or scaled
        logits) go through `logits()`."""
        head = self.model.get_output_embeddings()
        decoder = self.model.get_decoder()
        if (self.model.config.model_type not in PLAIN_HEAD_MODEL_TYPES
                or not isinstance(head, torch.nn.Linear) or decoder is self.model):
            return nll_from_logits(self, input_ids, keep, labels)
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, -keep:]
        scored = labels != -100
        hidden, targets = hidden[scored.to(hidden.device)], labels[scored].to(hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, len(targets), HEAD_CHUNK):
            logits = _upcast(head(hidden[start:start + HEAD_CHUNK]))
            total += F.cross_entropy(logits, targets[start:start + HEAD_CHUNK],
                                     reduction="sum").double()
        return total


def load_hf_scorer(base_params: Any, checkpoint: str | None) -> HFScorer:
    if checkpoint is not None:
        raise NewllmError(f"eval_ppl.checkpoint ({checkpoint}) is for trained model kinds; "
                          "model_kind hf evaluates base.model itself, expected null.")
    return HFScorer.from_base(base_params.load(), base_params.separator_token)


DOCUMENT_MODES = ("separate", "stream")


def build_stream(docs: list[torch.Tensor], separator_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents joined as [sep, d1, sep, d2, ...] and the mask of positions to score."""
    pieces, mask = [], []
    for doc in docs:
        pieces += [torch.tensor([separator_id]), doc.long()]
        mask += [torch.zeros(1, dtype=torch.bool), torch.ones(len(doc), dtype=torch.bool)]
    return torch.cat(pieces), torch.cat(mask)


def build_streams(docs: list[torch.Tensor], separator_id: int,
                  documents: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The token streams to score: one for all documents (`stream`), or one per document
    (`separate`, each `[sep, doc]`, as lm-evaluation-harness's loglikelihood_rolling)."""
    if documents not in DOCUMENT_MODES:
        raise NewllmError(f"eval_ppl.documents must be one of {', '.join(DOCUMENT_MODES)}, "
                          f"got {documents!r}.")
    if documents == "stream":
        return [build_stream(docs, separator_id)]
    return [build_stream([doc], separator_id) for doc in docs if len(doc)]


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


@dataclass(frozen=True, order=True)
class Window:
    stream: int  # index into the list of streams
    begin: int  # inputs are stream[begin:end]
    end: int
    scored: int  # the last `scored` inputs predict the scored targets

    @property
    def length(self) -> int:
        return self.end - self.begin


def window_batches(windows: list[Window], batch_size: int, context_length: int,
                   stride: int) -> list[list[Window]]:
    """Group windows into forward passes of at most `batch_size` ordinary windows' worth.

    A batch holds at most batch_size x context_length input tokens (padding included) and
    computes at most batch_size x stride rows of logits: a window that scores its whole
    length (every first window) weighs length/stride windows, so with a long context and a
    big vocabulary it gets a batch of its own instead of multiplying the logits of a whole
    batch. Short documents (`separate`) share a batch. Longest windows go first, so rows of
    a batch have similar lengths and little padding.
    """
    order = sorted(windows, key=lambda w: (-w.length, -w.scored, w.stream, w.begin))
    batches: list[list[Window]] = []
    for window in order:
        if batches:
            candidate = [*batches[-1], window]
            length = candidate[0].length  # the longest row
            keep = length - min(w.length - w.scored for w in candidate)
            if (len(candidate) * length <= batch_size * context_length
                    and len(candidate) * keep <= batch_size * stride):
                batches[-1].append(window)
                continue
        batches.append([window])
    return batches


@dataclass(frozen=True)
class PplResult:
    nll: float  # summed negative log-likelihood, nats
    tokens: int
    words: int
    bytes: int
    windows: int  # 0 for a recurrent kind
    context_length: int | None  # None: not applicable (a recurrent kind reads whole streams)
    stride: int | None

    @property
    def token_ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_ppl(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))


def check_window(context_length: int, stride: int, max_length: int | None) -> None:
    """Stride and context that score every token once and fit the model's positions."""
    if stride > context_length:
        raise NewllmError(f"eval_ppl.stride ({stride}) must be <= eval_ppl.context_length "
                          f"({context_length}), or some tokens would never be scored.")
    if max_length is not None and context_length > max_length:
        raise NewllmError(f"eval_ppl.context_length ({context_length}) exceeds the model's "
                          f"max_position_embeddings ({max_length}).")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmax; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise NewllmError("eval-ppl: the model produced a non-finite loss (NaN/inf); "
                          "try base.dtype float32.")


@torch.inference_mode()
def sliding_window_nll(scorer: Scorer, streams: list[tuple[torch.Tensor, torch.Tensor]],
                       context_length: int, stride: int,
                       batch_size: int) -> tuple[float, int, int]:
    """Batched sliding-window NLL over `streams` ([N] ids, [N] score mask each).

    Returns (nll, scored tokens, windows). Rows of a batch are right-padded: under causal
    attention padding after a row's last token cannot change that row's logits.
    """
    check_window(context_length, stride, scorer.max_length)
    windows = [Window(i, b, e, n) for i, (ids, _) in enumerate(streams)
               for b, e, n in window_spans(len(ids), context_length, stride)]
    if not windows:
        raise NewllmError("the evaluated text has fewer than 2 tokens; nothing to score.")
    nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    batches = window_batches(windows, batch_size, context_length, stride)
    for batch in progress(batches, desc="eval-ppl", unit="batch"):
        length = batch[0].length
        keep = length - min(w.length - w.scored for w in batch)  # logits needed from the end
        inputs = torch.full((len(batch), length), scorer.separator_id, dtype=torch.long)
        labels = torch.full((len(batch), keep), -100, dtype=torch.long)
        for row, w in enumerate(batch):
            ids, mask = streams[w.stream]
            inputs[row, :w.length] = ids[w.begin:w.end]
            targets = slice(w.end + 1 - w.scored, w.end + 1)
            first = keep - (length - w.length) - w.scored  # column of the row's first target
            labels[row, first:first + w.scored] = torch.where(mask[targets], ids[targets], -100)
        summed_nll = getattr(scorer, "summed_nll", None)  # a kind's own fast path, if any
        loss = (summed_nll(inputs.to(scorer.device), keep, labels) if summed_nll is not None
                else nll_from_logits(scorer, inputs.to(scorer.device), keep, labels))
        _check_finite(loss)
        nll += loss.double().cpu()
        scored += int((labels != -100).sum())
    return float(nll), scored, len(windows)


@torch.inference_mode()
def recurrent_nll(scorer: Any, streams: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, int]:
    """(nll, scored tokens) of a recurrent kind: each stream read whole, state carried."""
    if not any(len(ids) > 1 for ids, _ in streams):
        raise NewllmError("the evaluated text has fewer than 2 tokens; nothing to score.")
    nll, scored = 0.0, 0
    for ids, mask in progress(streams, desc="eval-ppl", unit="stream"):
        loss = torch.as_tensor(scorer.stream_nll(ids, mask))
        _check_finite(loss)
        nll += float(loss)
        scored += int(mask[1:].sum())  # position 0 (a separator) is never a target
    return nll, scored


@torch.inference_mode()
def naive_sliding_window_nll(scorer: Scorer, stream: torch.Tensor, score_mask: torch.Tensor,
                             context_length: int, stride: int) -> tuple[float, int, int]:
    """The plain reference: one window at a time, full logits, target by target bookkeeping."""
    check_window(context_length, stride, None)
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
                 context_length: int, stride: int, batch_size: int, documents: str = "separate",
                 naive: bool = False) -> PplResult:
    """Token PPL, word PPL and bits per byte of whole documents `docs` (with raw `texts`)."""
    streams = build_streams(docs, separator_id, documents)
    if getattr(scorer, "stream_nll", None) is not None:
        nll, tokens = recurrent_nll(scorer, streams)
        return PplResult(nll, tokens, sum(count_words(t) for t in texts),
                         sum(count_bytes(t) for t in texts), 0, None, None)
    if naive:
        check_window(context_length, stride, scorer.max_length)
        if not any(len(ids) > 1 for ids, _ in streams):
            raise NewllmError("the evaluated text has fewer than 2 tokens; nothing to score.")
        nll, tokens, windows = 0.0, 0, 0
        for stream, mask in streams:
            one = naive_sliding_window_nll(scorer, stream, mask, context_length, stride)
            nll, tokens, windows = nll + one[0], tokens + one[1], windows + one[2]
    else:
        nll, tokens, windows = sliding_window_nll(scorer, streams, context_length, stride,
                                                  batch_size)
    return PplResult(nll, tokens, sum(count_words(t) for t in texts),
                     sum(count_bytes(t) for t in texts), windows, context_length, stride)
