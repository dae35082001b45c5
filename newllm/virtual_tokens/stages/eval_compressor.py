"""eval-compressor: held-out pairs (val documents only) read after no context, e*, the
controls, each compressor run's output and the full text.

Variants (each a prefix after the separator, for every held-out pair):
- `no_context`; `full_text` (the teacher itself: KL 0 and agreements 1 by construction, its
  row is the reference for the NLL);
- `e_star`: the pair's own optimized e*, the per-pair oracle (an upper reference: no
  compressor that reads only the text's hidden states is trained to beat it);
- `e_star_shuffled`: another held-out pair's e* (a fixed derangement): how much of e*'s gain
  is about its own text;
- `mean_e_star`: the mean optimized training e* per virtual position, the same vectors for
  every pair (its norm is far below any e*'s: averaging shrinks it);
- `norm_matched`: that mean's direction scaled to the training e*'s mean norm per position;
- `random`: a seeded random direction per pair, of that same norm;
- per compressor run `<run>`: its output for the pair's text; `<run>_shuffled`: its output for
  another pair's text (the same derangement); `<run>_mean_output`: its mean output over the
  training texts (a constant of its own size, the control at any k).

Per variant and figure (KL to the teacher, top-1 / top-k agreement, NLL of the real follow
tokens, greedy agreement length) the mean over pairs and a bootstrap 95 % interval resampled
by document (`_lo`, `_hi`). Per compressor: its KL minus each control's and minus e*'s (the
amortization gap), paired over pairs, with the same intervals; the vector regression against
e* where e* has its k; its compression ratio. Runs that differ only in their seed are also
summarised over seeds (mean, sd, n). Also writes the nearest vocabulary tokens of the e* and
predicted vectors of the first few held-out pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.core.artifacts import write_csv, write_json, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.core.stats import bootstrap_interval, derangement, mean_sd
from newllm.virtual_tokens.compressor import (
    COMPRESSOR_FILE,
    compressor_dir,
    load_compressor,
)
from newllm.virtual_tokens.e_star import load_e_star
from newllm.virtual_tokens.evaluate import (
    evaluate_prefixes,
    mean_constant,
    norm_matched_constant,
    random_same_norm,
    vector_figures,
)
from newllm.virtual_tokens.recovery import nearest_tokens

FIGURES = ("kl", "top1", "topk", "nll", "greedy_len")
CONTROLS = ("no_context", "e_star", "e_star_shuffled", "mean_e_star", "norm_matched", "random",
            "full_text")
RUN_SUFFIXES = ("_shuffled", "_mean_output")  # a run's own controls
# the train-compressor keys that do not make two runs different settings
NOT_SETTINGS = {"seed", "name", "out_dir", "metrics_dir", "plots_dir"}


@dataclass
class EvalCompressorParams:
    group = "eval_compressor"
    e_star_dir: str = param("artifacts/e_star", "build-e-star's output folder (its "
                            "val.safetensors holds the held-out pairs, its train.safetensors "
                            "the training e* of the constant controls).")
    compressors: str = param("artifacts/compressors", "train-compressor's output folder: "
                             "reads <compressors>/<run>/compressor.safetensors for each run "
                             "of params group compressor_runs.")
    greedy_tokens: int = param(16, "Length of the teacher's greedy continuation compared.",
                               min=1)
    topk: int = param(5, "k of the top-k agreement.", min=1)
    batch_size: int = param(16, "Pairs per forward pass.", min=1)
    shuffle_seed: int = param(0, "Seed of the derangement (which other pair's vectors a pair "
                              "reads in the shuffled controls) and of the random vectors.",
                              min=0)
    resamples: int = param(2000, "Bootstrap resamples of each interval (documents resampled).",
                           min=100)
    nearest_examples: int = param(3, "Held-out pairs whose vectors get nearest tokens.",
                                  min=0)
    nearest_k: int = param(5, "Nearest vocabulary tokens per vector.", min=1)
    metrics: str = param("metrics/e_star/eval.json", "Metrics JSON.", output="metrics")
    plot: str = param("plots/e_star/eval.csv", "Per-variant means and KL intervals (plot "
                      "data).", output="plot")
    nearest: str = param("metrics/e_star/nearest.json", "Nearest vocabulary tokens of a few "
                         "e* and predicted vectors (JSON).", output="metrics")


def seed_groups(settings: dict[str, dict]) -> list[list[str]]:
    """Runs grouped by their train-compressor params but the seed (and names, folders):
    each group of two or more is one setting trained with several seeds."""
    groups: dict[str, list[str]] = {}
    for run, params in settings.items():
        key = repr(sorted((k, repr(v)) for k, v in params.items() if k not in NOT_SETTINGS))
        groups.setdefault(key, []).append(run)
    return [runs for runs in groups.values() if len(runs) > 1]


@stage_command("eval-compressor", BaseParams, EvalCompressorParams,
               reads_runs=("compressor_runs",),
               help="On held-out pairs, compare the base after no context, e*, the controls "
                    "(another pair's e*, the mean and the norm-matched training e*, random "
                    "vectors of e*'s norm), each compressor's vectors for its own text, for "
                    "another pair's text and on average, and the full text: KL to the "
                    "teacher, top-1/top-k agreement, NLL, greedy agreement length, each with "
                    "a bootstrap interval over documents; paired differences of each "
                    "compressor against the controls; nearest tokens of a few vectors.")
def eval_compressor(base_params: BaseParams, params: EvalCompressorParams, *,
                    compressor_runs: list[str]) -> None:
    """Evaluates every run of params group `compressor_runs` (the runs train-compressor made)."""
    runs = compressor_runs
    taken = {r for r in runs if r in CONTROLS or any(f"{o}{s}" == r for o in runs
                                                       for s in RUN_SUFFIXES)}
    if taken:
        raise NewllmError(f"compressor_runs: a run may not be named "
                          f"{', '.join(sorted(taken))} (the names of the other variants: "
                          f"{', '.join(CONTROLS)}, and <run>{', <run>'.join(RUN_SUFFIXES)}).")
    start = time.perf_counter()
    base = base_params.load()
    info = base.info.as_dict()
    folder = Path(params.e_star_dir)
    val = load_e_star(folder / "val.safetensors", info)
    train = load_e_star(folder / "train.safetensors", info)
    if not bool(val.has_e_star.all()):
        raise NewllmError(f"{folder / 'val.safetensors'}: every held-out pair needs its e* "
                          "(the oracle); re-run build-e-star.")
    sep_id = int(val.meta["extra"]["separator_token_id"])
    device = base.device
    n = len(val.texts)
    shuffle = torch.tensor(derangement(n, params.shuffle_seed))
    train_e_star = train.optimized_e_star()
    predicted, mean_output, settings = {}, {}, {}
    for run in runs:
        compressor, artifact = load_compressor(
            compressor_dir(params.compressors, run) / COMPRESSOR_FILE, info, device)
        settings[run] = artifact.meta["params"]["train_compressor"]
        with torch.no_grad():
            predicted[run] = compressor(val.context_hidden.to(device),
                                        val.context_mask.to(device)).cpu()
            mean_output[run] = compressor(train.context_hidden.to(device),
                                          train.context_mask.to(device)).mean(dim=0).cpu()
    k = val.num_virtual
    variants: dict = {
        "no_context": None, "e_star": val.e_star, "e_star_shuffled": val.e_star[shuffle],
        "mean_e_star": mean_constant(train_e_star).expand(n, k, -1),
        "norm_matched": norm_matched_constant(train_e_star).expand(n, k, -1),
        "random": random_same_norm(n, train_e_star, params.shuffle_seed)}
    for run, vectors in predicted.items():
        variants |= {run: vectors, f"{run}_shuffled": vectors[shuffle],
                     f"{run}_mean_output": mean_output[run].expand(n, -1, -1)}
    variants["full_text"] = None
    results = evaluate_prefixes(base.model, sep_id, val.texts, val.follows, variants,
                                greedy_tokens=params.greedy_tokens, topk=params.topk,
                                batch_size=params.batch_size)
    groups = val.doc_index.tolist()

    def interval(values: torch.Tensor) -> tuple[float, float]:
        return bootstrap_interval(values.double().tolist(), groups, params.resamples)

    text_tokens = torch.tensor([len(t) for t in val.texts]).float().mean().item()
    metrics: dict = {"val_pairs": n, "val_documents": len(set(groups)),
                     "train_pairs": len(train.texts), "train_e_star_pairs": len(train_e_star),
                     "num_virtual": k, "text_tokens_mean": text_tokens,
                     "compression_ratio": text_tokens / k,
                     "greedy_tokens": params.greedy_tokens, "topk": params.topk,
                     "e_star_stored_kl": val.final_kl.mean().item()}
    for name, figures in results.items():
        for key in FIGURES:
            values = figures[key]
            metrics[f"{name}_{key}"] = values.mean().item()
            metrics[f"{name}_{key}_lo"], metrics[f"{name}_{key}_hi"] = interval(values)
    for name in ("mean_e_star", "norm_matched", "random", *predicted):
        if variants[name].shape[1] == k:
            for key, value in vector_figures(variants[name], val.e_star).items():
                metrics[f"{name}_{key}"] = value

    def difference(name: str, minus: str, key: str) -> None:
        values = results[name]["kl"] - results[minus]["kl"]
        metrics[key] = values.mean().item()
        metrics[f"{key}_lo"], metrics[f"{key}_hi"] = interval(values)

    difference("e_star", "e_star_shuffled", "e_star_minus_shuffled_kl")
    difference("e_star", "norm_matched", "e_star_minus_norm_matched_kl")
    for run in predicted:
        metrics[f"{run}_num_virtual"] = predicted[run].shape[1]
        metrics[f"{run}_compression_ratio"] = text_tokens / predicted[run].shape[1]
        difference(run, "e_star", f"{run}_amortization_gap")
        difference(run, f"{run}_shuffled", f"{run}_minus_shuffled_kl")
        difference(run, f"{run}_mean_output", f"{run}_minus_mean_output_kl")
        difference(run, "mean_e_star", f"{run}_minus_mean_e_star_kl")
        difference(run, "norm_matched", f"{run}_minus_norm_matched_kl")
    for group in seed_groups(settings):
        for what in ("kl", "minus_shuffled_kl", "minus_norm_matched_kl"):
            summary = mean_sd([metrics[f"{r}_{what}"] for r in group])
            for stat, value in summary.items():
                metrics[f"{group[0]}_over_seeds_{what}_{stat}"] = value
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_metrics(params.metrics, metrics)
    write_csv(params.plot, ["variant", *FIGURES, "kl_lo", "kl_hi"],
              [[name, *(f"{metrics[f'{name}_{key}']:.6g}" for key in FIGURES),
                f"{metrics[f'{name}_kl_lo']:.6g}", f"{metrics[f'{name}_kl_hi']:.6g}"]
               for name in results])

    embeddings = base.model.get_input_embeddings().weight.detach().float().cpu()
    tokenizer = base.tokenizer
    examples = []
    for i in range(min(params.nearest_examples, n)):
        entry: dict = {"text": tokenizer.decode(val.texts[i]),
                       "follow_text": tokenizer.decode(val.follows[i])}
        for name, vectors in {"e_star": val.e_star, **predicted}.items():
            ids, sims = nearest_tokens(vectors[i].float(), embeddings, params.nearest_k)
            entry[name] = [[[tokenizer.decode([t]), round(s, 4)] for t, s in
                            zip(row_ids.tolist(), row_sims.tolist(), strict=True)]
                           for row_ids, row_sims in zip(ids, sims, strict=True)]
        examples.append(entry)
    write_json(params.nearest, {"examples": examples})

    def kl(name: str) -> str:
        return (f"{metrics[f'{name}_kl']:.4f} [{metrics[f'{name}_kl_lo']:.4f}, "
                f"{metrics[f'{name}_kl_hi']:.4f}]")

    rows = [f"{name:>22}: KL {kl(name)}, top-1 {metrics[f'{name}_top1']:.3f}, "
            f"greedy {metrics[f'{name}_greedy_len']:.2f}/{params.greedy_tokens}"
            for name in results]
    gaps = "\n".join(f"{r}: vs shuffled {kl(f'{r}_minus_shuffled')}, vs norm-matched "
                     f"{kl(f'{r}_minus_norm_matched')}, vs its mean output "
                     f"{kl(f'{r}_minus_mean_output')}" for r in predicted)
    click.echo(f"eval-compressor: {n} held-out pairs, KL in nats with 95 % intervals\n"
               + "\n".join(rows) + "\n" + gaps + f"\n{metrics['seconds']}s")
