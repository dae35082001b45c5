"""The passkey task: a fact a working memory must carry across segments (the positive control).

A passkey sequence is `segments` task segments of `segment_length` tokens (the task's own,
fixed when training starts and recorded in the model artifact, so every model of a run set
is probed on the task it was trained on):

    segment 0        [sep] The pass key is 7 7 7 7 7 7 7 7 7 7 7. Remember it.
    segments 1..d    <filler>                       (d = the distance, in filler segments)
    segment d+1      What is the pass key? The pass key is 7. <filler>
    the rest         <filler>

The filler is the classic one (Mohtashami & Jaggi 2023): "The grass is green. The sky is
blue. ...", each filler segment the same first `segment_length` tokens of it. The key is one
decimal digit, one token of the tokenizer after a shared lead (SmolLM2 writes " 7" as "Ġ",
"7"); no digit occurs in the filler or the question, so only segment 0 tells the answer.
Even at d = 0 the key is in another segment than the question: a model that attends within
one segment, with no memory, cannot know it.

Probe: the sequence is read up to the answer, in the model's own segments (memory carried),
and a trial counts when the true digit's log-probability is strictly the highest among
`candidates` digits (the true one and `candidates − 1` others drawn at random). The key is
drawn uniformly and independently of anything a key-blind model sees, so such a model is
right with probability exactly 1 / candidates whatever its preferences among digits: chance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from newllm.core.errors import NewllmError
from newllm.core.stats import wilson_interval

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
          "back again. ")
KEY_OPENING, KEY_CLOSING = "The pass key is", ". Remember it."
QUESTION = "What is the pass key? The pass key is"
DIGITS = 10


@dataclass(frozen=True)
class PasskeyTokens:
    """The task's pieces as token ids of one tokenizer."""

    separator: int
    lead: list[int]  # what precedes a digit written after a space (SmolLM2: ["Ġ"])
    digits: list[int]  # the token of each digit 0..9
    opening: list[int]
    closing: list[int]
    question: list[int]
    period: list[int]
    filler: list[int]  # long enough for any segment

    @classmethod
    def build(cls, tokenizer, separator_id: int, segment_length: int) -> PasskeyTokens:
        def encode(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        spaced = [encode(f" {d}") for d in range(DIGITS)]
        lead = spaced[0][:-1]
        digits = [ids[-1] for ids in spaced]
        if any(ids[:-1] != lead for ids in spaced) or len(set(digits)) != DIGITS:
            raise NewllmError("the passkey task needs a tokenizer that writes ' 0' ... ' 9' as "
                              "one shared lead and one distinct token per digit; base.model's "
                              "does not.")
        filler = encode(" " + FILLER * (segment_length // 4 + 2))
        tokens = cls(separator_id, lead, digits, encode(KEY_OPENING), encode(KEY_CLOSING),
                     encode(QUESTION), encode("."), filler)
        text = {*tokens.filler, *tokens.question, *tokens.period, *tokens.opening,
                *tokens.closing}
        if text & set(digits):
            raise NewllmError("the passkey filler or question contains a digit token; the "
                              "answer would not be carried by the key alone.")
        return tokens

    def vocabulary(self) -> list[int]:
        """Every token the task writes."""
        return list(dict.fromkeys([self.separator, *self.lead, *self.digits, *self.opening,
                                   *self.closing, *self.question, *self.period,
                                   *self.filler]))


@dataclass(frozen=True)
class PasskeyTask:
    """`segments` task segments of `segment_length` tokens (see the module docstring)."""

    segment_length: int
    segments: int

    @property
    def max_distance(self) -> int:
        """The largest distance whose question fits in a training sequence."""
        return self.segments - 2

    def key_segment(self, t: PasskeyTokens, key: int) -> list[int]:
        """[sep] The pass key is 7 7 ... 7. Remember it. <filler>: the key written as many
        times as the segment holds (at least once), so that it dominates what the segment
        leaves in memory."""
        digit = [*t.lead, t.digits[key]]
        fixed = 1 + len(t.opening) + len(t.closing)
        repeats = max(1, (self.segment_length - fixed) // len(digit))
        return self._fill([t.separator, *t.opening, *digit * repeats, *t.closing], t)

    def question_prefix(self, t: PasskeyTokens) -> list[int]:
        """The question up to the answer: the model predicts the key's digit next."""
        return [*t.question, *t.lead]

    def _fill(self, ids: list[int], t: PasskeyTokens) -> list[int]:
        if len(ids) > self.segment_length:
            raise NewllmError(f"the passkey sentence takes {len(ids)} tokens, more than a "
                              f"task segment of {self.segment_length} "
                              "(train_lm.passkey_segment_length).")
        return ids + t.filler[:self.segment_length - len(ids)]

    def sequence(self, t: PasskeyTokens, key: int, distance: int, length: int) -> list[int]:
        """`length` tokens: key segment, `distance` filler segments, the question with its
        answer, then filler; the answer sits at `answer_position(distance)`."""
        s = self.segment_length
        question = self._fill([*self.question_prefix(t), t.digits[key], *t.period], t)
        ids = self.key_segment(t, key) + t.filler[:s] * distance + question
        while len(ids) < length:
            ids += t.filler[:s]
        return ids[:length]

    def answer_position(self, t: PasskeyTokens, distance: int) -> int:
        return (distance + 1) * self.segment_length + len(self.question_prefix(t))


def passkey_task(sequence_tokens: int, segment_length: int) -> PasskeyTask:
    """The task whose sequences are training sequences of `sequence_tokens` tokens."""
    if sequence_tokens % segment_length:
        raise NewllmError(f"a training sequence of {sequence_tokens} tokens "
                          "(train_lm.segment_length x segments_per_sequence) is not a whole "
                          f"number of passkey segments of {segment_length} "
                          "(train_lm.passkey_segment_length).")
    return PasskeyTask(segment_length, sequence_tokens // segment_length)


def training_sequences(task: PasskeyTask, tokens: PasskeyTokens, n: int, length: int,
                       rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, length] passkey sequences and their answer positions [n]; each key uniform over
    the digits, each distance uniform over 0 .. task.max_distance."""
    if task.max_distance < 0:
        raise NewllmError(f"a passkey sequence needs at least 2 task segments, got "
                          f"{task.segments}; raise train_lm.segments_per_sequence.")
    keys = [rng.randrange(DIGITS) for _ in range(n)]
    distances = [rng.randint(0, task.max_distance) for _ in range(n)]
    rows = [task.sequence(tokens, k, d, length) for k, d in zip(keys, distances, strict=True)]
    return (torch.tensor(rows, dtype=torch.long).view(n, length),
            torch.tensor([task.answer_position(tokens, d) for d in distances], dtype=torch.long))


@torch.no_grad()
def last_logprobs(model: torch.nn.Module, rows: torch.Tensor, segment_length: int) -> torch.Tensor:
    """Full-vocabulary log-probabilities [B, V] of the token after rows [B, T], read from an
    empty memory in the model's segments (memory carried, as training reads them)."""
    model.reset_memory()
    for start in range(0, rows.shape[1], segment_length):
        logits = model(rows[:, start:start + segment_length])
    return model.full_logprobs(logits[:, -1])


@dataclass(frozen=True)
class PasskeyResult:
    distance: int
    correct: int
    trials: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.trials)


@torch.no_grad()
def passkey_probe(model: torch.nn.Module, model_segment_length: int, task: PasskeyTask,
                  tokens: PasskeyTokens, distances: list[int], trials: int, candidates: int,
                  seed: int) -> list[PasskeyResult]:
    """Passkey accuracy at each distance (see the module docstring); all trials of a
    distance in one batch."""
    if not 2 <= candidates <= DIGITS:
        raise NewllmError(f"passkey candidates must be between 2 and {DIGITS} (the digits), "
                          f"got {candidates}.")
    results = []
    for distance in distances:
        rng = random.Random(seed * 1000 + distance)
        keys = [rng.randrange(DIGITS) for _ in range(trials)]
        others = [rng.sample([d for d in range(DIGITS) if d != k], candidates - 1) for k in keys]
        end = task.answer_position(tokens, distance)
        rows = torch.tensor([task.sequence(tokens, k, distance, end) for k in keys])
        device = next(model.parameters()).device
        lp = last_logprobs(model, rows.to(device), model_segment_length).cpu()
        digit_lp = lp[:, tokens.digits]  # [trials, 10]
        true = digit_lp[torch.arange(trials), torch.tensor(keys)]
        rival = torch.stack([digit_lp[i, o].max() for i, o in enumerate(others)])
        results.append(PasskeyResult(distance, int((true > rival).sum()), trials))
    return results
