"""eval-memory: a train-lm model's memory-compressions curve and passkey accuracy.

See `newllm.infini.probes`: PPL of fixed late val segments after 0, 1, 2, 4, ... segments
were compressed into memory; and `newllm.infini.passkey`: passkey retrieval accuracy after n
filler segments, on the task the model was trained with (recorded in its artifact), with
Wilson 95 % intervals and chance 1 / candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams, load_tokenizer
from newllm.core.cli import stage_command
from newllm.core.data import SPLITS, load_split
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.core.ppl import build_stream
from newllm.core.runtime import single_thread
from newllm.infini.passkey import DIGITS, PasskeyTask, PasskeyTokens, passkey_probe
from newllm.infini.probes import compressions_curve
from newllm.infini.training import load_lm


@dataclass
class EvalMemoryParams:
    group = "eval_memory"
    checkpoint: str = param("artifacts/infini/infini/model.safetensors",
                            "train-lm model artifact.")
    data: str = param("data/prepared", "Prepared data folder.")
    split: str = param("val", "Split whose stream gives the target segments.", choices=SPLITS)
    max_compressions: int = param(64, "Largest number of segments compressed before a "
                                  "target (n = 0, 1, 2, 4, ... up to it).", min=1)
    targets: int = param(16, "Target segments averaged at each n.", min=1)
    passkey_fillers: list[int] = param(  # noqa: RUF009 (param copies the list)
        [0, 1, 2, 4, 6, 12], "Distances: numbers of filler segments between the key's "
        "segment and the question's.", min=0)
    passkey_trials: int = param(100, "Passkey trials per distance.", min=1)
    passkey_candidates: int = param(10, "Digits ranked per trial (the true one included; "
                                    "chance = 1 / candidates).", min=2, max=DIGITS)
    seed: int = param(0, "Seed of the keys (train-lm's per-epoch curve uses seed + 1).",
                      min=0)
    metrics: str = param("metrics/infini/eval_memory.json", "Metrics JSON to write.",
                         output="metrics")
    plot: str = param("plots/infini/compressions.csv", "Compressions curve (CSV: "
                      "compressions, ppl).", output="plot")
    passkey_plot: str = param("plots/infini/passkey.csv", "Passkey curve (CSV: distance, "
                              "accuracy, lo, hi, chance).", output="plot")

    def check(self) -> None:
        if not self.passkey_fillers:
            raise NewllmError("eval_memory.passkey_fillers must list at least one number of "
                              "filler segments, got [].")


@stage_command("eval-memory", BaseParams, EvalMemoryParams,
               help="Memory probes of a train-lm model: PPL of fixed late segments vs the "
                    "number of segments compressed into memory before them, and passkey "
                    "retrieval accuracy vs the number of filler segments.")
def eval_memory(base_params: BaseParams, params: EvalMemoryParams) -> None:
    tokenizer, info = load_tokenizer(base_params.model)
    model, meta = load_lm(params.checkpoint, base=info.tokenizer_only())
    segment_length = meta["extra"]["segment_length"]
    separator_id = meta["extra"]["separator_id"]
    docs, _ = load_split(params.data, params.split, base=info.tokenizer_only()).documents()
    stream, _ = build_stream(docs, separator_id)
    task = PasskeyTask(**meta["extra"]["passkey_task"])
    tokens = PasskeyTokens.build(tokenizer, separator_id, task.segment_length)
    with single_thread():
        curve = compressions_curve(model, stream, segment_length, params.max_compressions,
                                   params.targets)
        passkey = passkey_probe(model, segment_length, task, tokens, params.passkey_fillers,
                                params.passkey_trials, params.passkey_candidates, params.seed)
    chance = 1 / params.passkey_candidates
    write_csv(params.plot, ["compressions", "ppl"], [[n, f"{p:.6g}"] for n, p in curve])
    write_csv(params.passkey_plot, ["distance", "accuracy", "lo", "hi", "chance"],
              [[r.distance, f"{r.accuracy:.4g}", *(f"{x:.4g}" for x in r.interval()),
                f"{chance:.4g}"] for r in passkey])
    write_metrics(params.metrics, {
        "kind": model.config.kind, "use_delta_rule": model.config.use_delta_rule,
        "use_alibi": model.config.use_alibi, "segment_length": segment_length,
        "memory_gradient": model.config.memory_gradient, "targets": params.targets,
        "passkey_segment_length": task.segment_length, "passkey_segments": task.segments,
        "passkey_trials": params.passkey_trials,
        "passkey_candidates": params.passkey_candidates, "passkey_chance": chance,
        **{f"ppl_after_{n}": p for n, p in curve},
        **{f"passkey_after_{r.distance}": r.accuracy for r in passkey},
        **{f"passkey_after_{r.distance}_{end}": x for r in passkey
           for end, x in zip(("lo", "hi"), r.interval(), strict=True)},
    })
    click.echo(f"eval-memory {model.config.kind}: PPL by compressions "
               + ", ".join(f"{n}: {p:.1f}" for n, p in curve) + "; passkey accuracy by "
               "distance " + ", ".join(f"{r.distance}: {r.accuracy:.2f}" for r in passkey)
               + f" (chance {chance:.2f}, {params.passkey_trials} trials each)")
