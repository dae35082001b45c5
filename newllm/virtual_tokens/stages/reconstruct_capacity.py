"""reconstruct-capacity: how long a text k optimized vectors can hold (the cramming setting).

For each `num_virtual` k and each length L, the first L tokens of `texts_per_length` val
documents are crammed into k vectors (build-e-star's reconstruct objective: `[sep, e*]` must
reproduce the text); all lengths of one k are optimized together in one padded batch. The
capacity of k is the longest L at which greedy decoding after `[sep, e*]` reproduces every
text exactly. Writes the curve (plot data) and flat metrics `capacity_k<k>`.
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
from newllm.core.tokens import separator_token_id
from newllm.core.train import COMPUTE_DTYPES
from newllm.virtual_tokens.e_star import (
    INITS,
    EStarConfig,
    check_context_fits,
    make_pairs,
    optimize_batch,
    reconstruction_metrics,
)


@dataclass
class ReconstructCapacityParams:
    group = "reconstruct_capacity"
    data: str = param("data/prepared", "Prepared data: texts from val documents.")
    # param() gives a list default a default_factory, so instances never share it
    num_virtual_list: list[int] = param([1, 2], "Values of k (virtual tokens) to measure "  # noqa: RUF009
                                        "(measured in increasing order).", min=1)
    lengths: list[int] = param([4, 8, 16], "Text lengths in tokens (in increasing order).",  # noqa: RUF009
                               min=1)
    texts_per_length: int = param(1, "Texts (distinct documents) per length.", min=1)
    steps: int = param(50, "Adam steps.", min=1)
    lr: float = param(0.1, "Adam learning rate (cosine-decayed to 0).", min=1e-12)
    init: str = param("mean_embedding", "Start of e*.", choices=INITS)
    compute_dtype: str = param("float32", "Precision of the base's forward.",
                               choices=COMPUTE_DTYPES)
    seed: int = param(0, "Seed of the choice of documents.", min=0)
    metrics: str = param("metrics/e_star/capacity.json", "Metrics JSON.", output="metrics")
    plot: str = param("plots/e_star/capacity.csv", "Capacity curve (plot data).", output="plot")

    def check(self) -> None:
        for key in ("num_virtual_list", "lengths"):
            if not getattr(self, key):
                raise NewllmError(f"reconstruct_capacity.{key} is empty; list at least one "
                                  "positive integer.")


@stage_command("reconstruct-capacity", BaseParams, ReconstructCapacityParams,
               help="Cram the first L tokens of val documents into k optimized vectors "
                    "([sep, e*] must reproduce the text) for each k and L; report token "
                    "accuracy, greedy exact-match length and the longest exactly reproduced "
                    "length per k.")
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
    rows, metrics = [], {"texts_per_length": params.texts_per_length, "steps": params.steps}
    start = time.perf_counter()
    for k in ks:
        config = EStarConfig("reconstruct", k, params.steps, params.lr, params.init,
                             compute_dtype=params.compute_dtype, batch_size=len(texts))
        result = optimize_batch(base.model, config, sep_id, texts, None)
        accuracy, exact = reconstruction_metrics(base.model, sep_id, result.e_star, texts,
                                                 params.compute_dtype)
        capacity = 0
        for i, n in enumerate(lengths):
            chunk = slice(i * len(pairs), (i + 1) * len(pairs))
            exact_fraction = (exact[chunk] == n).float().mean().item()
            if exact_fraction == 1.0:
                capacity = n
            rows.append([k, n, f"{exact_fraction:.4g}", f"{accuracy[chunk].mean().item():.4g}",
                         f"{exact[chunk].float().mean().item():.4g}",
                         f"{result.final_loss[chunk].mean().item():.4g}"])
            metrics[f"k{k}_len{n}_exact"] = exact_fraction
            metrics[f"k{k}_len{n}_accuracy"] = accuracy[chunk].mean().item()
        metrics[f"capacity_k{k}"] = capacity
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_metrics(params.metrics, metrics)
    write_csv(params.plot, ["num_virtual", "length", "exact_fraction", "token_accuracy",
                            "greedy_exact_len", "final_ce"], rows)
    curve = ", ".join(f"k={k}: {metrics[f'capacity_k{k}']}" for k in ks)
    click.echo(f"reconstruct-capacity (longest exactly reproduced length, lengths {lengths}): "
               f"{curve}; {metrics['seconds']}s")
