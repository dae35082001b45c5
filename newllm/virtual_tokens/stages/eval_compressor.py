"""eval-compressor: held-out pairs (val documents only) read after no context, e*, the mean
training e*, each compressor run's output and the full text.

The mean training e* (per virtual-token slot) is the same k vectors for every pair: the
control that tells what a compressor's vectors carry about their own text
beyond what any text's vectors do. Metrics (flat JSON): per variant the mean KL to the
teacher, top-1 / top-k agreement, NLL of the real follow tokens and greedy agreement length;
per compressor the vector regression (MSE, cosine, relative norm error), the amortization gap
(its KL minus e*'s) and its KL minus the mean e*'s; the compression ratio. The full text *is*
the teacher, so its KL is 0 and its agreements 1 by construction: its row is the reference
for the NLL. Also writes the nearest vocabulary tokens of the e* and predicted vectors of the
first few held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.core.artifacts import write_csv, write_json, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.virtual_tokens.compressor import (
    COMPRESSOR_FILE,
    compressor_dir,
    load_compressor,
)
from newllm.virtual_tokens.e_star import load_e_star
from newllm.virtual_tokens.evaluate import evaluate_prefixes, vector_figures
from newllm.virtual_tokens.recovery import nearest_tokens

FIGURES = ("kl", "top1", "topk", "nll", "greedy_len")
RESERVED = {"no_context", "e_star", "mean_e_star", "full_text"}  # the other variants' names


@dataclass
class EvalCompressorParams:
    group = "eval_compressor"
    e_star_dir: str = param("artifacts/e_star", "build-e-star's output folder (its "
                            "val.safetensors holds the held-out pairs).")
    compressors: str = param("artifacts/compressors", "train-compressor's output folder: "
                             "reads <compressors>/<run>/compressor.safetensors for each run "
                             "of params group compressor_runs.")
    greedy_tokens: int = param(16, "Length of the teacher's greedy continuation compared.",
                               min=1)
    topk: int = param(5, "k of the top-k agreement.", min=1)
    batch_size: int = param(16, "Pairs per forward pass.", min=1)
    nearest_examples: int = param(3, "Held-out pairs whose vectors get nearest tokens.",
                                  min=0)
    nearest_k: int = param(5, "Nearest vocabulary tokens per vector.", min=1)
    metrics: str = param("metrics/e_star/eval.json", "Metrics JSON.", output="metrics")
    plot: str = param("plots/e_star/eval.csv", "Per-variant means (plot data).", output="plot")
    nearest: str = param("metrics/e_star/nearest.json", "Nearest vocabulary tokens of a few "
                         "e* and predicted vectors (JSON).", output="metrics")


@stage_command("eval-compressor", BaseParams, EvalCompressorParams,
               reads_runs=("compressor_runs",),
               help="On held-out pairs, compare the base after no context, e*, each "
                    "compressor's vectors and the full text: KL to the teacher, top-1/top-k "
                    "agreement, NLL, greedy agreement length; vector regression and the "
                    "amortization gap of each compressor; nearest tokens of a few vectors.")
def eval_compressor(base_params: BaseParams, params: EvalCompressorParams, *,
                    compressor_runs: list[str]) -> None:
    """Evaluates every run of params group `compressor_runs` (the runs train-compressor made)."""
    runs = compressor_runs
    if set(runs) & RESERVED:
        raise NewllmError(f"compressor_runs: a run may not be named "
                          f"{', '.join(sorted(set(runs) & RESERVED))} (the names of the other "
                          f"variants: {', '.join(sorted(RESERVED))}).")
    base = base_params.load()
    info = base.info.as_dict()
    folder = Path(params.e_star_dir)
    val = load_e_star(folder / "val.safetensors", info)
    train_e_star = load_e_star(folder / "train.safetensors", info).e_star
    sep_id = int(val.meta["extra"]["separator_token_id"])
    device = base.device
    predicted = {}
    for run in runs:
        compressor, artifact = load_compressor(
            compressor_dir(params.compressors, run) / COMPRESSOR_FILE, info, device)
        if compressor.config.num_virtual != val.num_virtual:
            raise NewllmError(f"{artifact.path} emits {compressor.config.num_virtual} virtual "
                              f"tokens but the e* set has {val.num_virtual}; retrain it.")
        with torch.no_grad():
            predicted[run] = compressor(val.context_hidden.to(device),
                                        val.context_mask.to(device)).cpu()
    mean_e_star = train_e_star.mean(dim=0, keepdim=True).expand_as(val.e_star)
    variants: dict = {"no_context": None, "e_star": val.e_star, "mean_e_star": mean_e_star,
                      **predicted, "full_text": None}
    results = evaluate_prefixes(base.model, sep_id, val.texts, val.follows, variants,
                                greedy_tokens=params.greedy_tokens, topk=params.topk,
                                batch_size=params.batch_size)
    text_tokens = torch.tensor([len(t) for t in val.texts]).float().mean().item()
    metrics: dict = {"val_pairs": len(val.texts), "num_virtual": val.num_virtual,
                     "text_tokens_mean": text_tokens,
                     "compression_ratio": text_tokens / val.num_virtual,
                     "greedy_tokens": params.greedy_tokens, "topk": params.topk,
                     "e_star_stored_kl": val.final_kl.mean().item()}
    for name, figures in results.items():
        for key in FIGURES:
            metrics[f"{name}_{key}"] = figures[key].mean().item()
    for run, vectors in {"mean_e_star": mean_e_star, **predicted}.items():
        for key, value in vector_figures(vectors, val.e_star).items():
            metrics[f"{run}_{key}"] = value
    for run in predicted:
        metrics[f"{run}_amortization_gap"] = metrics[f"{run}_kl"] - metrics["e_star_kl"]
        metrics[f"{run}_minus_mean_e_star_kl"] = (metrics[f"{run}_kl"]
                                                  - metrics["mean_e_star_kl"])
    write_metrics(params.metrics, metrics)
    write_csv(params.plot, ["variant", *FIGURES],
              [[name, *(f"{metrics[f'{name}_{k}']:.6g}" for k in FIGURES)] for name in results])

    embeddings = base.model.get_input_embeddings().weight.detach().float().cpu()
    tokenizer = base.tokenizer
    examples = []
    for i in range(min(params.nearest_examples, len(val.texts))):
        entry: dict = {"text": tokenizer.decode(val.texts[i]),
                       "follow_text": tokenizer.decode(val.follows[i])}
        for name, vectors in {"e_star": val.e_star, **predicted}.items():
            ids, sims = nearest_tokens(vectors[i].float(), embeddings, params.nearest_k)
            entry[name] = [[[tokenizer.decode([t]), round(s, 4)] for t, s in
                            zip(row_ids.tolist(), row_sims.tolist(), strict=True)]
                           for row_ids, row_sims in zip(ids, sims, strict=True)]
        examples.append(entry)
    write_json(params.nearest, {"examples": examples})

    rows = [f"{name:>10}: KL {metrics[f'{name}_kl']:.4f}, top-1 {metrics[f'{name}_top1']:.3f}, "
            f"greedy {metrics[f'{name}_greedy_len']:.2f}/{params.greedy_tokens}"
            for name in results]
    gaps = ", ".join(f"{r} {metrics[f'{r}_amortization_gap']:+.4f} (vs mean e* "
                     f"{metrics[f'{r}_minus_mean_e_star_kl']:+.4f})" for r in predicted)
    click.echo(f"eval-compressor: {len(val.texts)} held-out pairs, compression "
               f"{metrics['compression_ratio']:.1f}x\n" + "\n".join(rows)
               + f"\namortization gap (KL): {gaps}")
