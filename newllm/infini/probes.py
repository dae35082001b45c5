"""What the memory holds on real text: the memory-compressions curve (the passkey probe,
what it holds of a planted fact, is in `newllm.infini.passkey`).

Compressions curve (the question Hugging Face's reproduction raised: does quality fall as
more segments are compressed into memory?). The val documents are read as one stream cut
into segments of the model's `segment_length`; `targets` late segments t are chosen evenly
(t ≥ the largest n). For each n in 0, 1, 2, 4, ... the memory starts empty, the n segments
before t are written to it, and segment t is scored (its first token predicted from the
end of segment t−1, which is context only): PPL(n) = exp(NLL of the target segments /
tokens). The same targets at every n, so the curve isolates the memory: flat for pythia,
which has none; falling if the memory helps; rising if compression hurts.
"""

from __future__ import annotations

import math

import torch

from newllm.infini.models import SegmentLM


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
