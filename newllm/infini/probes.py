"""What the memory holds: the memory-compressions curve and passkey retrieval.

Compressions curve (the question Hugging Face's reproduction raised: does quality fall as
more segments are compressed into memory?). The val documents are read as one stream cut
into segments of the model's `segment_length`; `targets` late segments t are chosen evenly
(t ≥ the largest n). For each n in 0, 1, 2, 4, ... the memory starts empty, the n segments
before t are written to it, and segment t is scored (its first token predicted from the
end of segment t−1, which is context only): PPL(n) = exp(NLL of the target segments /
tokens). The same targets at every n, so the curve isolates the memory: flat for pythia,
which has none; falling if the memory helps; rising if compression hurts.

Passkey: a 5-digit key in the first segment ("The pass key is 52817. Remember it."), then n
segments of filler text, then a segment "What is the pass key? The pass key is" completed by
the true key and by `candidates − 1` other random keys (seeded); a trial counts when the
true key's summed log-likelihood is strictly the highest. Chance is 1 / candidates.
"""

from __future__ import annotations

import math
import random

import torch

from newllm.core.errors import NewllmError
from newllm.infini.models import SegmentLM

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
          "back again. ")
PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def doubling(limit: int) -> list[int]:
    """0, 1, 2, 4, ... up to `limit` (included when it is not a power of two)."""
    values = [0]
    n = 1
    while n <= limit:
        values.append(n)
        n *= 2
    if values[-1] != limit and limit > 0:
        values.append(limit)
    return values


@torch.no_grad()
def read_segments(model: SegmentLM, rows: torch.Tensor, segment_length: int) -> torch.Tensor:
    """Write rows [B, n·S] segment by segment into a fresh memory."""
    model.reset_memory()
    for start in range(0, rows.shape[1], segment_length):
        model.write_memory(rows[:, start:start + segment_length])
    return rows


@torch.no_grad()
def compressions_curve(model: SegmentLM, stream: torch.Tensor, segment_length: int,
                       max_compressions: int, targets: int) -> list[tuple[int, float]]:
    """(n, PPL of the target segments after n compressed segments) for n = 0, 1, 2, 4, ..."""
    s = segment_length
    n_segments = (len(stream) - 1) // s
    limit = min(max_compressions, n_segments - 1)
    if limit < 0:
        raise ValueError("the stream is shorter than one segment")
    first = limit  # target segments t in [limit, n_segments)
    picks = sorted({first + (i * (n_segments - 1 - first)) // max(1, targets - 1)
                    for i in range(targets)})
    curve = []
    for n in doubling(limit):
        inputs = torch.stack([stream[(t - n) * s:t * s] for t in picks]) if n else None
        if inputs is not None:
            read_segments(model, inputs, s)
        else:
            model.reset_memory()
        segment = torch.stack([stream[t * s:(t + 1) * s] for t in picks])
        target = torch.stack([stream[t * s + 1:(t + 1) * s + 1] for t in picks])
        lp = model.token_logprobs(model(segment), target)
        curve.append((n, math.exp(-float(lp.double().mean()))))
    return curve


@torch.no_grad()
def passkey_accuracy(model: SegmentLM, tokenizer, separator_id: int, segment_length: int,
                     fillers: list[int], trials: int, candidates: int,
                     seed: int) -> list[tuple[int, float]]:
    """(n filler segments, accuracy) for each n of `fillers`."""
    s = segment_length

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    filler_ids = encode(FILLER * (s // 4 + 2))
    filler_segment = filler_ids[:s]
    question = encode(QUESTION)
    q = len(question)
    results = []
    for n in fillers:
        rng = random.Random(seed * 1000 + n)
        prefixes, answers = [], []  # a row per (trial, candidate); the true key first
        for _ in range(trials):
            keys = rng.sample(range(10000, 100000), candidates)
            first = [separator_id, *encode(PASSKEY.format(key=keys[0])), *filler_ids][:s]
            prefixes += [first + filler_segment * n] * candidates
            answers += [encode(f" {key}.") for key in keys]
        width = q + max(len(a) for a in answers)
        if width > s:
            raise NewllmError(f"the passkey question and a key take {width} tokens, more "
                              f"than the model's segment of {s} (train_lm.segment_length).")
        # right-padded: causal, so padding changes nothing
        tail = torch.tensor([question + a + [separator_id] * (width - q - len(a))
                             for a in answers])
        read_segments(model, torch.tensor(prefixes), s)  # all trials in one batch
        lp = model.token_logprobs(model(tail[:, :-1]), tail[:, 1:])
        scores = torch.stack([lp[i, q - 1:q - 1 + len(a)].sum() for i, a in enumerate(answers)])
        scores = scores.view(trials, candidates)
        correct = (scores[:, :1] > scores[:, 1:]).all(dim=1).sum().item()
        results.append((n, correct / trials))
    return results
