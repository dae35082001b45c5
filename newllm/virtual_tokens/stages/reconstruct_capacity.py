"""reconstruct-capacity: how long a text k optimized vectors can hold (the cramming setting).

For each `num_virtual` k and each length L, the first L tokens of `texts_per_length` val
documents are crammed into k vectors: the base reads `[sep, e*, text]` and every text token,
the first included, is predicted (the separator comes first, as everywhere in this line, so
the first text token is predicted at the last virtual position). Each row is optimized (Adam,
constant `lr`, all rows of one k in one padded batch) until greedy decoding after
`[sep, e*]` reproduces its text exactly or `max_steps` is reached; rows that finish leave the
batch. Per k and L: the share of texts reproduced exactly (with a Wilson interval), the
steps to exactness of those that were, the failures; the capacity of k is the longest L at
which every text was reproduced. Writes flat metrics and one plot row per text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import click

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.data import load_split
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.core.runtime import seed_everything
from newllm.core.stats import wilson_interval
from newllm.core.tokens import separator_token_id
from newllm.core.train import COMPUTE_DTYPES
from newllm.virtual_tokens.e_star import (
    INITS,
    EStarConfig,
    check_context_fits,
    make_pairs,
    reconstruct_until_exact,
)


@dataclass
class ReconstructCapacityParams:
    group = "reconstruct_capacity"
    data: str = param("data/prepared", "Prepared data: texts from val documents.")
    # param() gives a list default a default_factory, so instances never share it
    num_virtual_list: list[int] = param([1, 2], "Values of k (virtual tokens) to measure "  # noqa: RUF009
                                        "(measured in increasing order).", min=1)
    lengths: list[int] = param([8, 16, 32], "Text lengths in tokens (in increasing order).",  # noqa: RUF009
                               min=1)
    texts_per_length: int = param(2, "Texts (distinct documents) per length; every length "
                                  "reads the same documents (a longer text extends a shorter "
                                  "one).", min=1)
    max_steps: int = param(800, "Step cap: a text not reproduced exactly after this many "
                           "Adam steps is a failure.", min=1)
    lr: float = param(0.01, "Adam learning rate (constant).", min=1e-12)
    init: str = param("mean_embedding", "Start of e*.", choices=INITS)
    compute_dtype: str = param("float32", "Precision of the base's forward.",
                               choices=COMPUTE_DTYPES)
    seed: int = param(0, "Seed of the choice of documents.", min=0)
    metrics: str = param("metrics/e_star/capacity.json", "Metrics JSON.", output="metrics")
    plot: str = param("plots/e_star/capacity.csv", "Capacity curve, one row per text (k, "
                      "length, document, exact, steps, greedy exact length, final CE).",
                      output="plot")

    def check(self) -> None:
        for key in ("num_virtual_list", "lengths"):
            if not getattr(self, key):
                raise NewllmError(f"reconstruct_capacity.{key} is empty; list at least one "
                                  "positive integer.")


@stage_command("reconstruct-capacity", BaseParams, ReconstructCapacityParams,
               help="Cram the first L tokens of val documents into k optimized vectors "
                    "([sep, e*] must reproduce the text) for each k and L, each text until "
                    "greedy decoding reproduces it exactly or max_steps; report the share "
                    "exact, steps to exactness, failures and the longest length every text "
                    "of which was reproduced, per k.")
def reconstruct_capacity(base_params: BaseParams, params: ReconstructCapacityParams) -> None:
    ks, lengths = sorted(set(params.num_virtual_list)), sorted(set(params.lengths))
    base = base_params.load()
    check_context_fits(base.model, 1 + max(ks) + max(lengths),
                       "1 + max(num_virtual_list) + max(lengths)")
    seed_everything(params.seed)
    sep_id = separator_token_id(base.tokenizer, base_params.separator_token)
    docs, _ = load_split(params.data, "val", base=base.info.tokenizer_only()).documents()
    longest = max(lengths)
    # the same documents for every length: a longer text extends a shorter one
    pairs = make_pairs(docs, params.texts_per_length, longest, 0, params.seed,
                       f"reconstruct_capacity.data '{params.data}' val split")
    texts = [text[:n] for n in lengths for _, text, _ in pairs]
    rows, metrics = [], {"texts_per_length": params.texts_per_length,
                         "max_steps": params.max_steps, "lr": params.lr}
    start = time.perf_counter()
    for k in ks:
        config = EStarConfig("reconstruct", k, params.max_steps, params.lr, params.init,
                             compute_dtype=params.compute_dtype, batch_size=len(texts))
        result = reconstruct_until_exact(base.model, config, sep_id, texts, params.max_steps,
                                         desc=f"reconstruct-capacity k={k}")
        capacity = 0
        for i, n in enumerate(lengths):
            chunk = slice(i * len(pairs), (i + 1) * len(pairs))
            exact, steps = result.exact[chunk], result.steps[chunk]
            done = int(exact.sum())
            if done == len(pairs):
                capacity = n
            low, high = wilson_interval(done, len(pairs))
            key = f"k{k}_len{n}"
            metrics |= {f"{key}_exact": done / len(pairs), f"{key}_exact_lo": low,
                        f"{key}_exact_hi": high, f"{key}_failures": len(pairs) - done,
                        f"{key}_steps_mean": (steps[exact].float().mean().item() if done
                                              else None),
                        f"{key}_steps_max": int(steps[exact].max()) if done else None,
                        f"{key}_exact_len_mean": result.exact_len[chunk].float().mean().item()}
            for j, (doc, _, _) in enumerate(pairs):
                row = i * len(pairs) + j
                rows.append([k, n, doc, int(result.exact[row]), int(result.steps[row]),
                             int(result.exact_len[row]), f"{result.final_ce[row].item():.4g}"])
        metrics[f"capacity_k{k}"] = capacity
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_metrics(params.metrics, metrics)
    write_csv(params.plot, ["num_virtual", "length", "document", "exact", "steps",
                            "greedy_exact_len", "final_ce"], rows)
    curve = "; ".join(
        f"k={k}: " + ", ".join(f"L={n} {metrics[f'k{k}_len{n}_exact']:.2f}" for n in lengths)
        + f" (capacity {metrics[f'capacity_k{k}']})" for k in ks)
    click.echo(f"reconstruct-capacity, share reproduced exactly within {params.max_steps} "
               f"steps: {curve}; {metrics['seconds']}s")
