"""eval-reversal: the reversal curse on child/parent pairs, for the base, a train-lm model or
the base with a train-infini-adapter memory.

Per direction, answer-only figures (see `newllm.core.reversal`): the log-probability of the
answer after its relation prompt ("Tom Cruise's mother is" -> the parent; "Mary Lee
Pfeiffer's child is" -> the child), its answer-token PPL, and rank accuracy of the true
answer among `distractors` other names of the same relation, each with a 95 % interval. On
real pairs and the base this is a knowledge probe (what the base knows of famous facts, in
either direction); the reversal experiment proper is `inject-facts`. For a model that was
shown pairs of the same file (train-lm's or train-infini-adapter's `reversal_facts`), the
figures are also given for the injected pairs and for the never-injected control, as its
checkpoint records them; for the base (no checkpoint), `inject_fraction` gives the same two
halves a training run with that fraction makes, as the untrained reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from newllm.core.artifacts import read_meta, write_metrics
from newllm.core.base import BaseParams, load_tokenizer
from newllm.core.cli import stage_command
from newllm.core.params import param
from newllm.core.ppl import SCORER_KINDS, load_scorer
from newllm.core.reversal import (
    DEFAULT_TEMPLATES,
    FORMATS,
    SHIPPED,
    file_hash,
    injected_split,
    parse_templates,
    read_pairs,
    score_pairs,
    summarize,
)


@dataclass
class EvalReversalParams:
    group = "eval_reversal"
    model_kind: str = param("hf", "hf = base.model; infini-lm = a train-lm model or "
                            "base.model with a train-infini-adapter memory, read from "
                            "`checkpoint`.", choices=tuple(SCORER_KINDS))
    checkpoint: str | None = param(None, "train-lm / train-infini-adapter model artifact "
                                   "(null for hf).")
    pairs: str = param(SHIPPED, "Pairs file: parent_child_pairs.csv format (child,parent,"
                       "parent_type,...) or JSONL; 'shipped' = the package's own "
                       "(newllm/core/reversal_pairs.csv).")
    format: str = param("csv", "Format of the pairs file.", choices=FORMATS)
    max_pairs: int | None = param(None, "Evaluate the first this many pairs (null = all).",
                                  min=1)
    distractors: int = param(4, "Other names of the same relation each true answer is "
                             "ranked against.", min=1)
    templates: list[str] = param(  # noqa: RUF009 (param copies the list)
        DEFAULT_TEMPLATES, "[forward, backward] sentence templates over {child}, {parent}, "
        "{parent_type}, {inverse_type}; each ends with its answer.")
    seed: int = param(0, "Seed of the distractor draw and the bootstrap.", min=0)
    inject_fraction: float | None = param(0.5, "For the base (no checkpoint): also report "
                                          "the injected / never-injected halves a training "
                                          "run with this reversal_inject_fraction makes "
                                          "(train-lm's default; null = no split). A "
                                          "checkpoint reports the halves it recorded, if "
                                          "any.", min=0.0, max=1.0)
    metrics: str = param("metrics/infini/eval_reversal.json", "Metrics JSON to write.",
                         output="metrics")

    def check(self) -> None:
        parse_templates(self.templates)


@stage_command("eval-reversal", BaseParams, EvalReversalParams,
               help="Reversal curse on child/parent facts: answer-only log-probabilities "
                    "and rank accuracy against same-type distractors, both directions, with "
                    "intervals; injected vs never-injected pairs for a trained model (as it "
                    "recorded them) and for the base (the same halves).")
def eval_reversal(base_params: BaseParams, params: EvalReversalParams) -> None:
    pool = read_pairs(params.pairs, params.format)  # distractors come from the whole file
    pairs = pool[:params.max_pairs] if params.max_pairs is not None else pool
    scorer = load_scorer(params.model_kind, base_params, params.checkpoint)
    tokenizer, _ = load_tokenizer(base_params.model)
    scores = score_pairs(scorer, tokenizer, pairs, pool, params.templates, params.distractors,
                         params.seed)
    metrics = {"model_kind": params.model_kind, "checkpoint": params.checkpoint,
               "model_id": scorer.info.model_id, "pairs_file": params.pairs,
               "distractors": params.distractors, "chance_rank_accuracy":
               1 / (params.distractors + 1), **summarize(scores, seed=params.seed)}
    injected: set[str] | None = None
    if params.checkpoint is not None:
        shown = read_meta(params.checkpoint).get("extra", {}).get("reversal") or {}
        if shown.get("pairs_hash") == file_hash(params.pairs):
            injected = set(shown.get("injected", []))
            metrics["split"] = "checkpoint"
    if params.checkpoint is None and params.inject_fraction is not None:
        injected = {p.key for p in injected_split(pool, params.inject_fraction)[0]}
        metrics["split"] = f"inject_fraction {params.inject_fraction}"
    if injected is not None:
        metrics.update(summarize([s for p, s in zip(pairs, scores, strict=True)
                                  if p.key in injected], "injected_", params.seed))
        metrics.update(summarize([s for p, s in zip(pairs, scores, strict=True)
                                  if p.key not in injected], "control_", params.seed))
    write_metrics(params.metrics, metrics)
    click.echo(f"eval-reversal on {len(pairs)} pairs: answer log-prob forward "
               f"{metrics['forward_answer_logprob']:.2f}, backward "
               f"{metrics['backward_answer_logprob']:.2f}; rank accuracy forward "
               f"{metrics['forward_rank_accuracy']:.3f}, backward "
               f"{metrics['backward_rank_accuracy']:.3f} (chance "
               f"{metrics['chance_rank_accuracy']:.3f})")
