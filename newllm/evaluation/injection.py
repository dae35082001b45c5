"""The reversal curse reproduced on the pretrained base with facts it cannot know.

Berglund et al. (2023) fine-tune on fictitious "A is B" facts and find that a model which
learned "A is B" does not answer "B is ?" better than chance. Here, on child/parent facts:

- three disjoint sets of `fictitious_pairs` (invented people, no name of the real pairs
  files): `forward_only` (trained on "{child}'s {parent_type} is {parent}."), `both` (the
  paper's control: trained on that and on "{parent}'s {inverse_type} is {child}."), and
  `unseen` (never trained on: what the fine-tuning does to facts it never saw);
- the base is fine-tuned (the shared Trainer; AdamW, constant rate; the tied token
  embeddings stay frozen) on the training sentences, whole-sentence language-model loss,
  until the forward rank accuracy of the injected facts (`forward_only`) reaches
  `target_accuracy` (checked after epochs), or `max_epochs`;
- then every set is scored in both directions on the answer only (`newllm.core.reversal`):
  log p(answer | prompt) and rank accuracy among same-relation distractors *of the same set*
  (names the model saw in the same role, so familiarity with a name does not win), with
  95 % intervals; chance is 1 / (distractors + 1).

The reversal curse shows as `forward_only` backward at the `unseen` level (chance) while its
forward is high; `both` backward high shows the backward direction is learnable when seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from newllm.core.reversal import (
    Answered,
    Pair,
    PairScores,
    Question,
    answer_questions,
    fictitious_pairs,
    parse_templates,
    questions,
    sentences,
    summarize,
)
from newllm.core.stats import bootstrap_difference
from newllm.core.train import Epoch, Trainer

SETS = ("forward_only", "both", "unseen")
TRAINED = ("forward_only", "both")
CHECKED = ("forward_only",)  # the stopping rule's set: the injected "A is B" facts


@dataclass(frozen=True)
class FactSets:
    pairs: dict[str, list[Pair]]  # set name -> its pairs
    forward: dict[str, list[Question]]  # set name -> the forward question of each pair
    backward: dict[str, list[Question]]


def make_fact_sets(per_set: int, seed: int, exclude: Sequence[Pair], templates: Sequence[str],
                   distractors: int, key: str = "inject_facts.distractors") -> FactSets:
    """Three sets of `per_set` fictitious pairs (fathers and mothers alternating in each),
    their questions with distractors drawn within the set (fixed once, seeded)."""
    pairs = fictitious_pairs(len(SETS) * per_set, seed, exclude)
    by_set = {name: pairs[i::len(SETS)] for i, name in enumerate(SETS)}
    forward, backward = {}, {}
    for i, (name, members) in enumerate(by_set.items()):
        forward[name], backward[name] = questions(members, members, templates, distractors,
                                                  seed + i, key)
    return FactSets(by_set, forward, backward)


def training_sentences(sets: FactSets, templates: Sequence[str]) -> list[str]:
    """Forward sentences of `forward_only`; forward and backward sentences of `both`."""
    parsed = parse_templates(templates)
    out = [sentences(p, parsed)[0] for p in sets.pairs["forward_only"]]
    for pair in sets.pairs["both"]:
        out += list(sentences(pair, parsed))
    return out


def lm_loss(model: Any, rows: torch.Tensor, ids: list[list[int]], separator_id: int,
            device: torch.device) -> torch.Tensor:
    """Mean next-token loss of the sentences `rows`, each read as [separator, sentence]
    (right-padded; padding is never a target, and under causal attention cannot change a
    row's earlier positions)."""
    batch = [ids[i] for i in rows.tolist()]
    length = 1 + max(len(b) for b in batch)
    inputs = torch.full((len(batch), length), separator_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for r, sentence in enumerate(batch):
        inputs[r, 1:1 + len(sentence)] = torch.tensor(sentence)
        labels[r, 1:1 + len(sentence)] = torch.tensor(sentence)
    return model(input_ids=inputs.to(device), labels=labels.to(device), use_cache=False).loss


@dataclass(frozen=True)
class Check:
    """The forward rank accuracy of each CHECKED set after an epoch (0: the base)."""

    epoch: int
    train_loss: float | None
    accuracy: dict[str, float]


def forward_check(scorer: Any, tokenizer: Any, sets: FactSets, batch_size: int
                  ) -> dict[str, float]:
    asked = [q for name in CHECKED for q in sets.forward[name]]
    answered = answer_questions(scorer, tokenizer, asked, batch_size)
    out, first = {}, 0
    for name in CHECKED:
        part = answered[first:first + len(sets.forward[name])]
        out[name] = sum(a.correct for a in part) / len(part)
        first += len(part)
    return out


def fine_tune(trainer: Trainer, model: torch.nn.Module, ids: list[list[int]],
              separator_id: int, generator: torch.Generator,
              check: Callable[[], dict[str, float]], target: float,
              check_from: int = 1) -> tuple[list[Check], list[Epoch]]:
    """Train until every checked set's forward accuracy (`check()`, asked before training
    and after every epoch from `check_from` on) reaches `target`, or the trainer's epochs
    run out; the checks, epoch 0 (the base) first."""
    checks = [Check(0, None, check())]

    def stop(_: torch.nn.Module, epoch: Epoch) -> bool:
        if epoch.epoch < check_from:
            return False
        checks.append(Check(epoch.epoch, epoch.train_loss, check()))
        return min(checks[-1].accuracy.values()) >= target

    parameters = [p for p in model.parameters() if p.requires_grad]
    history = trainer.fit(model, lambda m, rows: lm_loss(m, rows, ids, separator_id,
                                                         trainer.device),
                          len(ids), generator, desc="inject-facts", parameters=parameters,
                          stop=stop)
    return checks, history


def set_scores(answered: list[Answered], sets: FactSets) -> dict[str, list[PairScores]]:
    """Answers of [forward of every set, then backward of every set] as PairScores per set."""
    out, first = {}, 0
    half = sum(len(sets.forward[name]) for name in SETS)
    for name in SETS:
        n = len(sets.forward[name])
        out[name] = [PairScores(f.logprob, b.logprob, f.tokens, b.tokens, f.correct, b.correct,
                                f.margin, b.margin)
                     for f, b in zip(answered[first:first + n],
                                     answered[half + first:half + first + n], strict=True)]
        first += n
    return out


def evaluate_sets(scorer: Any, tokenizer: Any, sets: FactSets, batch_size: int,
                  seed: int) -> dict[str, float | int]:
    """Every set in both directions (`summarize` with the set's name as prefix), and the
    backward log-probability gains of the trained sets over `unseen`, with intervals."""
    asked = [q for name in SETS for q in sets.forward[name]] + \
            [q for name in SETS for q in sets.backward[name]]
    scores = set_scores(answer_questions(scorer, tokenizer, asked, batch_size), sets)
    metrics: dict[str, float | int] = {}
    for name in SETS:
        metrics.update(summarize(scores[name], f"{name}__", seed))  # set__figure
    for name in TRAINED:
        for direction in ("forward", "backward"):
            gain, lo, hi = bootstrap_difference(
                [getattr(s, f"{direction}_logprob") for s in scores[name]],
                [getattr(s, f"{direction}_logprob") for s in scores["unseen"]], seed=seed)
            metrics.update({f"{name}__{direction}_logprob_gain": gain,
                            f"{name}__{direction}_logprob_gain_lo": lo,
                            f"{name}__{direction}_logprob_gain_hi": hi})
    return metrics
