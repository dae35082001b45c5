"""Training the factory's models on segments, and scoring them the way eval-ppl does.

Training data: the prepared train split as one stream `[sep, d1, sep, d2, ...]` (plus, with
`reversal_facts`, the forward sentences of the injected pairs as extra documents, repeated),
cut after `max_train_tokens` into sequences of `segment_length × segments_per_sequence + 1`
tokens. Per sequence the memory starts empty; the model reads segment after segment, the
memory carried (and detached) between them; the loss is the mean full-vocabulary NLL over
all tokens of the sequence (one backward per batch of sequences; no gradient crosses a
segment boundary because the memory is detached).

The softmax has `shortlist` classes: the most frequent training tokens (and every token of
the reversal pairs file, so names stay distinguishable), plus "other", inside which a token
gets its smoothed unigram share (`SegmentLM.set_vocabulary`): log-likelihoods remain over
the tokenizer's whole vocabulary and comparable with the base's.

`SegmentScorer` is eval-ppl's scorer of these models (model kind `infini-lm`): a recurrent
kind whose `stream_nll` reads a stream in consecutive segments of `segment_length`,
carrying the memory, exactly as training reads it; train-lm's per-epoch val PPL goes
through `newllm.core.ppl.evaluate_ppl` with this scorer, the code eval-ppl runs.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from newllm.core.artifacts import load_artifact, read_meta, save_artifact
from newllm.core.base import BaseInfo
from newllm.core.errors import NewllmError
from newllm.core.ppl import build_stream
from newllm.core.runtime import single_thread
from newllm.infini.models import LM_KIND, LMConfig, SegmentLM

LOW_PPL, HIGH_PPL = 5.0, 1000.0  # the seed's diagnostic bands


def training_stream(docs: list[torch.Tensor], facts: list[list[int]], separator_id: int,
                    max_tokens: int | None, rng: random.Random,
                    group: str = "train_lm") -> torch.Tensor:
    """[sep, d1, sep, d2, ...] of the corpus until `max_tokens` less the facts' share, with
    each fact (a document of its own) at a seeded random place between documents. `group`
    names the calling stage's params group in errors."""
    fact_tokens = sum(len(f) + 1 for f in facts)
    budget = None if max_tokens is None else max_tokens - fact_tokens
    if budget is not None and budget < 1:
        raise NewllmError(f"the injected facts take {fact_tokens} tokens, more than "
                          f"{group}.max_train_tokens ({max_tokens}); lower reversal_repeats.")
    chosen, total = [], 0
    for doc in docs:
        if budget is not None and total >= budget:
            break
        chosen.append(doc)
        total += len(doc) + 1
    pieces = [*chosen, *(torch.tensor(f) for f in facts)]
    order = list(range(len(chosen)))
    for j in range(len(chosen), len(pieces)):  # facts at random places, corpus order kept
        order.insert(rng.randint(0, len(order)), j)
    stream, _ = build_stream([pieces[i] for i in order], separator_id)
    return stream if max_tokens is None else stream[:max_tokens]


def ppl_flag(ppl: float) -> str:
    """The seed's reading of a PPL: below 5 a leak or causal-mask bug, above 1000 not
    learning."""
    if ppl < LOW_PPL:
        return "suspicious_low"
    if ppl > HIGH_PPL:
        return "not_learning"
    return "ok"


def build_vocabulary(train_ids: torch.Tensor, extra_ids: list[int], vocab_size: int,
                     shortlist: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shortlist ids [K], training counts [V]): every id of `extra_ids` first, then the most
    frequent training ids (ties by id, so the choice is deterministic)."""
    counts = torch.bincount(train_ids.long(), minlength=vocab_size)[:vocab_size]
    chosen = list(dict.fromkeys(int(i) for i in extra_ids))[:shortlist]
    taken = set(chosen)
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
    for i in order:
        if len(chosen) == shortlist:
            break
        if i not in taken:
            chosen.append(i)
            taken.add(i)
    return torch.tensor(sorted(chosen)), counts


def make_sequences(stream: torch.Tensor, seq_tokens: int) -> torch.Tensor:
    """[N, seq_tokens + 1] consecutive chunks of the stream (each overlaps the next by one
    token, the last target)."""
    n = (len(stream) - 1) // seq_tokens
    if n < 1:
        raise NewllmError(f"the training stream has {len(stream)} tokens, fewer than one "
                          f"sequence of {seq_tokens + 1}; lower train_lm.segment_length or "
                          "segments_per_sequence, or raise max_train_tokens.")
    return torch.stack([stream[i * seq_tokens:(i + 1) * seq_tokens + 1] for i in range(n)])


def sequence_loss(model: SegmentLM, batch: torch.Tensor, segment_length: int,
                  answers: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of a batch of sequences [B, L+1] read in segments with the memory carried: the
    mean over sequences of each one's NLL, a text sequence's over all its tokens and a
    passkey sequence's (answers[i] >= 0, the answer's position) over its answer alone (the
    rest of it is the prompt). Without `answers`, every sequence is text."""
    model.reset_memory()
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if answers is None:
        answers = torch.full((len(batch),), -1, device=batch.device)
    passkey = answers >= 0
    weights = torch.where(passkey[:, None], 0.0, 1.0 / inputs.shape[1]).expand_as(inputs)
    positions = torch.arange(inputs.shape[1], device=batch.device)
    weights = torch.where(positions[None] == (answers - 1)[:, None], 1.0, weights)  # [B, L]
    total = torch.zeros((), device=batch.device)
    for start in range(0, inputs.shape[1], segment_length):
        logits = model(inputs[:, start:start + segment_length])
        lp = model.token_logprobs(logits, targets[:, start:start + segment_length])
        total = total - (lp * weights[:, start:start + segment_length]).sum()
    return total / len(batch)


@torch.no_grad()
def stream_logprobs(model: SegmentLM, ids: torch.Tensor, segment_length: int) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) for t = 1.. of one stream [N], memory reset at its start."""
    model.reset_memory()
    inputs, targets = ids[:-1][None], ids[1:][None]
    out = []
    for start in range(0, inputs.shape[1], segment_length):
        logits = model(inputs[:, start:start + segment_length])
        out.append(model.token_logprobs(logits, targets[:, start:start + segment_length])[0])
    return torch.cat(out)


@dataclass
class SegmentScorer:
    """eval-ppl's scorer of a SegmentLM (see the module docstring)."""

    model: SegmentLM
    segment_length: int
    device: torch.device
    info: BaseInfo
    separator_id: int
    separator_token: str
    max_length: int | None = None

    def stream_nll(self, ids: torch.Tensor, mask: torch.Tensor) -> float:
        with single_thread():
            lp = stream_logprobs(self.model, ids.to(self.device), self.segment_length)
        return float(-(lp.double().cpu() * mask[1:].double()).sum())

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Full-vocabulary log-probabilities [B, keep, V] of rows read from their first
        token in segments (memory reset per call)."""
        self.model.reset_memory()
        with single_thread():
            out = [self.model.full_logprobs(self.model(input_ids[:, s:s + self.segment_length]))
                   for s in range(0, input_ids.shape[1], self.segment_length)]
        return torch.cat(out, dim=1)[:, -keep:]


@dataclass
class WindowScorer:
    """eval-ppl's sliding-window scorer of a kind without memory (pythia): each window is
    read from scratch as one segment, so every token gets up to `max_length` tokens of
    context (the seeds' lesson 4), where the segment reading gives it 0 .. max_length − 1."""

    model: SegmentLM
    device: torch.device
    info: BaseInfo
    separator_id: int
    separator_token: str
    max_length: int

    def __post_init__(self) -> None:
        if self.model.memory is not None:
            raise NewllmError(f"a {self.model.config.kind} model carries memory between "
                              "segments; read it in segments, not in sliding windows.")

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        with single_thread():
            return self.model.full_logprobs(self.model(input_ids))[:, -keep:]

    @torch.no_grad()
    def summed_nll(self, input_ids: torch.Tensor, keep: int,
                   labels: torch.Tensor) -> torch.Tensor:
        """The NLL of `labels` [B, keep] (-100: not scored) without the full-vocabulary
        log-probabilities `logits()` spreads (eval-ppl's fast path)."""
        scored = labels != -100
        with single_thread():
            lp = self.model.token_logprobs(self.model(input_ids)[:, -keep:],
                                           labels.clamp_min(0))
        return -(lp.double() * scored).sum()


def memory_grad_norms(model: SegmentLM, rows: torch.Tensor, answers: torch.Tensor,
                      segment_length: int) -> dict[str, float]:
    """‖∂L/∂W‖ of the memory layer's Q, K and V projections, L the mean NLL of the passkey
    answers (rows [B, L+1], answer positions [B]): does the answer's loss reach what the
    memory writes? Empty for a kind without memory; the model's gradients are left clear."""
    memory = model.memory
    if memory is None:
        return {}
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model.reset_memory()
        inputs, targets = rows[:, :-1], rows[:, 1:]
        predicted = answers - 1  # the input position that predicts each answer
        total = torch.zeros(())
        for start in range(0, inputs.shape[1], segment_length):
            lp = model.token_logprobs(model(inputs[:, start:start + segment_length]),
                                      targets[:, start:start + segment_length])
            positions = torch.arange(start, start + lp.shape[1])
            total = total - (lp * (positions[None] == predicted[:, None])).sum()
        (total / len(rows)).backward()
    grad = memory.qkv.weight.grad
    d = model.config.d_model
    norms = {name: float(grad[i * d:(i + 1) * d].norm()) for i, name in enumerate("qkv")}
    model.zero_grad(set_to_none=True)
    model.reset_memory()
    return norms


def save_lm(path: str | Path, model: SegmentLM, *, segment_length: int, params: dict[str, Any],
            base: dict[str, Any], extra: dict[str, Any]) -> None:
    save_artifact(path, dict(model.state_dict()), kind=LM_KIND, stage="train-lm", params=params,
                  base=base, extra={"config": asdict(model.config),
                                    "segment_length": segment_length, **extra})


def load_lm(path: str | Path, base: dict[str, Any] | None = None,
            device: str | torch.device = "cpu") -> tuple[SegmentLM, dict[str, Any]]:
    """A trained model (eval mode) and its artifact metadata; checks kind and tokenizer."""
    artifact = load_artifact(path, kind=LM_KIND, base=base)
    config = LMConfig(**artifact.meta["extra"]["config"])
    model = SegmentLM(config)
    model.load_state_dict(artifact.tensors)
    return model.to(device).eval(), artifact.meta


def load_infini_scorer(base_params: Any, checkpoint: str | None) -> Any:
    """eval-ppl's `infini-lm` kind: a train-lm model read with base.model's tokenizer, or
    base.model with a train-infini-adapter artifact (`AdapterScorer`)."""
    from newllm.core.base import load_tokenizer
    from newllm.core.runtime import resolve_device
    from newllm.core.tokens import separator_token_id

    if checkpoint is None:
        raise NewllmError("model kind infini-lm needs a checkpoint: a train-lm model "
                          "(model.safetensors), got null.")
    if read_meta(checkpoint).get("kind") == "infini-adapter":
        # the line's other trained models: memory on the pretrained base (train-infini-adapter)
        from newllm.infini.adapter import load_adapter_scorer

        return load_adapter_scorer(base_params, checkpoint)
    tokenizer, info = load_tokenizer(base_params.model)
    device = resolve_device(base_params.device)
    model, meta = load_lm(checkpoint, base=info.tokenizer_only(), device=device)
    separator_id = separator_token_id(tokenizer, base_params.separator_token)
    if separator_id != meta["extra"].get("separator_id", separator_id):
        raise NewllmError(f"{checkpoint} was trained with separator id "
                          f"{meta['extra']['separator_id']}, base.separator_token gives "
                          f"{separator_id}.")
    return SegmentScorer(model, meta["extra"]["segment_length"], device, info, separator_id,
                         tokenizer.convert_ids_to_tokens(separator_id))
