"""inject-facts: the reversal curse on the pretrained base, with fictitious facts.

Fine-tunes base.model on "A's father is B" facts about invented people until it answers
them forward (rank accuracy ≥ `target_accuracy` against same-relation distractors), then
scores backward on the same facts, both directions on never-injected facts, and both
directions on a control set it was trained on in both directions (see
`newllm.evaluation.injection`). Writes the figures (with 95 % intervals) and the per-epoch
forward accuracy curve; the fine-tuned model is not kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import click

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.params import param
from newllm.core.ppl import HFScorer
from newllm.core.reversal import (
    DEFAULT_TEMPLATES,
    FORMATS,
    SHIPPED,
    file_hash,
    parse_templates,
    read_pairs,
)
from newllm.core.runtime import seed_everything, single_thread
from newllm.core.train import COMPUTE_DTYPES, TrainConfig, Trainer
from newllm.evaluation.injection import (
    CHECKED,
    SETS,
    evaluate_sets,
    fine_tune,
    forward_check,
    make_fact_sets,
    training_sentences,
)


@dataclass
class InjectFactsParams:
    group = "inject_facts"
    facts_per_set: int = param(50, "Fictitious pairs in each of the three sets (trained "
                               "forward only, trained both ways, never trained).", min=2)
    exclude_pairs: str = param(SHIPPED, "Real pairs file whose names (and surnames) no "
                               "fictitious name may use: 'shipped' = newllm/core/"
                               "reversal_pairs.csv, or a path (e.g. the paper's "
                               "parent_child_pairs.csv).")
    exclude_format: str = param("csv", "Format of exclude_pairs.", choices=FORMATS)
    templates: list[str] = param(  # noqa: RUF009 (param copies the list)
        DEFAULT_TEMPLATES, "[forward, backward] sentence templates over {child}, {parent}, "
        "{parent_type}, {inverse_type}; each ends with its answer.")
    distractors: int = param(4, "Names of the same relation and set each answer is ranked "
                             "against.", min=1)
    target_accuracy: float = param(0.9, "Stop once the forward rank accuracy of the "
                                   "forward-only facts reaches this.", min=0.0, max=1.0)
    max_epochs: int = param(8, "Epochs at most over the training sentences.", min=1)
    check_from_epoch: int = param(4, "First epoch after which the target is checked (each "
                                  "check scores every forward-only question; the base is "
                                  "checked too, as epoch 0).", min=1)
    lr: float = param(1.0e-4, "AdamW learning rate (constant).", min=0.0)
    batch_size: int = param(4, "Training sentences per step.", min=1)
    score_batch_size: int = param(16, "Scored sequences per forward pass.", min=1)
    train_embeddings: bool = param(False, "Also train the token embeddings (tied to the LM "
                                   "head in the default base).")
    compute_dtype: str = param("float32", "Training autocast dtype.", choices=COMPUTE_DTYPES)
    seed: int = param(0, "Seed of the names, the distractors, the batches and the "
                      "bootstrap.", min=0)
    metrics: str = param("metrics/evaluation/inject_facts.json", "Metrics JSON to write.",
                         output="metrics")
    plot: str = param("plots/evaluation/inject_facts.csv", "Per-epoch train loss and "
                      "forward rank accuracy of the trained sets (epoch 0: the base).",
                      output="plot")

    def check(self) -> None:
        parse_templates(self.templates, "inject_facts.templates")


@stage_command("inject-facts", BaseParams, InjectFactsParams,
               help="Reversal curse on the pretrained base: fine-tune on fictitious 'A's "
                    "parent is B' facts until forward rank accuracy reaches the target, then "
                    "backward accuracy and answer log-probs on those facts, on never-trained "
                    "facts and on facts trained both ways, with 95 % intervals.")
def inject_facts(base_params: BaseParams, params: InjectFactsParams) -> None:
    start = time.perf_counter()
    real = read_pairs(params.exclude_pairs, params.exclude_format,
                      key="inject_facts.exclude_pairs")
    sets = make_fact_sets(params.facts_per_set, params.seed, real, params.templates,
                          params.distractors)
    generator = seed_everything(params.seed)
    base = base_params.load()
    scorer = HFScorer.from_base(base, base_params.separator_token)
    texts = training_sentences(sets, params.templates)
    ids = [base.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = base.model
    model.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(params.train_embeddings)
    trainer = Trainer(TrainConfig("inject_facts", params.max_epochs, params.batch_size,
                                  params.lr, params.compute_dtype, optimizer="adamw",
                                  schedule="constant", device=base.device))
    # one thread: on a shared 2-core machine a second one made the 135M model's steps
    # 5-10x slower (measured), and one thread sums the same way on every machine
    check_seconds = 0.0

    def check() -> dict[str, float]:
        nonlocal check_seconds
        began = time.perf_counter()
        accuracy = forward_check(scorer, base.tokenizer, sets, params.score_batch_size)
        check_seconds += time.perf_counter() - began
        return accuracy

    with single_thread():
        began = time.perf_counter()
        checks, history = fine_tune(trainer, model, ids, scorer.separator_id, generator,
                                    check, params.target_accuracy, params.check_from_epoch)
        fit_seconds = time.perf_counter() - began
        model.eval().requires_grad_(False)
        began = time.perf_counter()
        figures = evaluate_sets(scorer, base.tokenizer, sets, params.score_batch_size,
                                params.seed)
        eval_seconds = time.perf_counter() - began
    reached = min(figures[f"{s}__forward_rank_accuracy"] for s in CHECKED) \
        >= params.target_accuracy  # on the final model, the same questions as the checks
    write_csv(params.plot, ["epoch", "train_loss", *[f"{s}_forward_rank_accuracy"
                                                    for s in CHECKED]],
              [[c.epoch, "" if c.train_loss is None else f"{c.train_loss:.8g}",
                *[f"{c.accuracy[s]:.6g}" for s in CHECKED]] for c in checks])
    metrics = {
        "model_id": base.info.model_id, "facts_per_set": params.facts_per_set,
        "sets": ",".join(SETS), "training_sentences": len(texts),
        "training_tokens_per_epoch": sum(len(i) for i in ids),
        "exclude_pairs": params.exclude_pairs,
        "exclude_pairs_hash": file_hash(params.exclude_pairs),
        "distractors": params.distractors, "chance_rank_accuracy": 1 / (params.distractors + 1),
        "target_accuracy": params.target_accuracy, "target_reached": reached,
        "epochs": history[-1].epoch, "max_epochs": params.max_epochs, "lr": params.lr,
        "final_train_loss": history[-1].train_loss,
        **figures,
        "train_seconds": round(fit_seconds - check_seconds, 2),
        "check_seconds": round(check_seconds, 2), "checks": len(checks),
        "eval_seconds": round(eval_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_metrics(params.metrics, metrics)
    rows = " | ".join(f"{s}: fwd {metrics[f'{s}__forward_rank_accuracy']:.2f}, bwd "
                      f"{metrics[f'{s}__backward_rank_accuracy']:.2f}" for s in SETS)
    click.echo(f"inject-facts after {metrics['epochs']} epoch(s) (target "
               f"{'reached' if reached else 'NOT reached'}): {rows} (chance "
               f"{metrics['chance_rank_accuracy']:.2f})")
