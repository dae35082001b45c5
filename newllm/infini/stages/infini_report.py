"""infini-report: the Infini-attention line's figures gathered into one metrics file.

The runs come from params.yaml, not a copy: every run of `infini_runs` (train-lm's) and of
`adapter_runs` (train-infini-adapter's). Reads the metrics the line's stages wrote into
`metrics_dir` (train_lm_<run>.json, eval_memory_<run>.json, eval_reversal_<run>.json of every
run; eval_reversal.json of the base) and the base's eval-ppl metrics, and writes one flat file
keyed `<row>__<figure>`, the row being the run's name: its val PPL (read in segments, and in
sliding windows for a kind without memory), passkey curve with intervals, compressions curve,
memory gradients and reversal figures. Runs that differ only in `seed` are one configuration:
its first run's row also gets the mean and sd of val PPL over them. The base model gives the
row `base`; the adapter runs on the pretrained base (`adapter_dir`: <run>.json,
eval_reversal_<run>.json of `reversal_adapter_runs`) add the rows adapter-base (the base read
in the adapter's segments) and adapter-<run>.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from newllm.core.artifacts import read_json_object, write_metrics
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import RunNames, param
from newllm.core.stats import mean_sd


@dataclass
class InfiniReportParams:
    group = "infini_report"
    metrics_dir: str = param("metrics/infini", "Folder of the line's metrics files.")
    base_ppl: str = param("metrics/eval_ppl.json", "The base model's eval-ppl metrics.")
    adapter_dir: str = param("metrics/infini_adapter", "Folder of train-infini-adapter's "
                             "metrics (<run>.json of each adapter_runs run) and eval-reversal's "
                             "(eval_reversal_<run>.json).")
    reversal_adapter_runs: list[str] = param(  # noqa: RUF009 (param copies the list)
        ["parallel", "frozen", "replace"], "Runs of adapter_runs that eval-reversal read.")
    metrics: str = param("metrics/infini_report.json", "Metrics JSON to write.", output="metrics")


def read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "a metrics JSON file",
                            "run the stage that writes it (dvc repro)")


# eval-reversal's answer-only figures, each with its 95 % interval (_lo, _hi)
REVERSAL_KEYS = tuple(f"{d}_{m}{end}" for d in ("forward", "backward")
                      for m in ("answer_logprob", "answer_margin", "rank_accuracy")
                      for end in ("", "_lo", "_hi"))


def reversal_figures(row: str, reversal: dict[str, Any]) -> dict[str, Any]:
    """`row`'s injected / never-injected figures from an eval-reversal metrics file."""
    return {f"{row}__{prefix}{k}": reversal[prefix + k] for prefix in ("injected_", "control_")
            for k in REVERSAL_KEYS if prefix + k in reversal}


def memory_figures(memory: dict[str, Any]) -> dict[str, Any]:
    """The compressions curve's ends and the passkey curve, each distance with its Wilson
    interval as text ("0.52 [0.42, 0.62]") beside the number."""
    after = sorted(int(k.rsplit("_", 1)[1]) for k in memory if k.startswith("ppl_after_"))
    distances = sorted(int(k.split("_")[2]) for k in memory
                       if k.startswith("passkey_after_") and k.count("_") == 2)
    out: dict[str, Any] = {"ppl_after_0": memory["ppl_after_0"],
                           "ppl_after_max": memory[f"ppl_after_{after[-1]}"],
                           "compressions_max": after[-1],
                           "passkey_chance": memory["passkey_chance"],
                           "passkey_trials": memory["passkey_trials"]}
    for d in distances:
        acc, lo, hi = (memory[f"passkey_after_{d}{end}"] for end in ("", "_lo", "_hi"))
        out.update({f"passkey_after_{d}": acc, f"passkey_after_{d}_lo": lo,
                    f"passkey_after_{d}_hi": hi,
                    f"passkey_d{d}": f"{acc:.2f} [{lo:.2f}, {hi:.2f}]"})
    return out


TRAIN_KEYS = ("parameters", "train_tokens", "passkey_sequences", "epochs", "seed",
              "val_ppl_flag", "val_ppl_last_change", "memory_grad_k_init", "memory_grad_k_final",
              "memory_grad_v_init", "memory_grad_v_final")


def train_figures(train: dict[str, Any]) -> dict[str, Any]:
    """train-lm's figures of a run: its val PPL read in segments (memory carried) and, for a
    kind without memory, in sliding windows; the gradient reaching the memory's K and V."""
    out = {k: train[k] for k in TRAIN_KEYS if train.get(k) is not None}
    out["val_ppl"] = train["val_ppl"]
    if train.get("val_ppl_window") is not None:
        out["val_ppl_window"] = train["val_ppl_window"]
        out["window_context_length"] = train["window_context_length"]
        out["window_stride"] = train["window_stride"]
    return out


def seed_figures(trains: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample sd over the seeds of one configuration (val PPL both ways)."""
    out: dict[str, Any] = {"seeds": len(trains)}
    for key in ("val_ppl", "val_ppl_window"):
        values = [t[key] for t in trains if t.get(key) is not None]
        if values:
            summary = mean_sd(values)
            out[f"{key}_seed_mean"], out[f"{key}_seed_sd"] = summary["mean"], summary["sd"]
            out[f"{key}_seeds"] = f"{summary['mean']:.1f} ± {summary['sd']:.1f} (n={len(values)})"
    return out


def adapter_figures(folder: Path, runs: list[str], reversal_runs: list[str]) -> dict[str, Any]:
    """Rows of the memory-on-the-base runs (`adapter-<run>`, by the run's mode). Their val PPL
    reads the first val documents in the adapter's segments (`segmented_val_ppl`), not
    eval-ppl's whole split; adapter-base is the base read that way (the first run's)."""
    unknown = [r for r in reversal_runs if r not in runs]
    if unknown:
        raise NewllmError(f"infini_report.reversal_adapter_runs: {', '.join(unknown)} is not a "
                          f"run of adapter_runs ({', '.join(runs)}).")
    out: dict[str, Any] = {}
    for run in runs:
        metrics = read_json(folder / f"{run}.json")
        row = f"adapter-{run}"
        out.setdefault("adapter-base__segmented_val_ppl", metrics["base_val_ppl"])
        if metrics["mode"] == "parallel":
            out[f"{row}__segmented_val_ppl"] = metrics["val_ppl"]
            out[f"{row}__alpha"] = metrics["alpha"]
            out[f"{row}__train_tokens"] = metrics["train_tokens"]
        else:
            out[f"{row}__after_distill_val_ppl"] = metrics["after_distill_val_ppl"]
            out[f"{row}__segmented_val_ppl"] = metrics["val_ppl"]
            out[f"{row}__distill_error_held_out"] = metrics["distill_error_held_out"]
    for run in reversal_runs:
        out.update(reversal_figures(f"adapter-{run}",
                                    read_json(folder / f"eval_reversal_{run}.json")))
    return out


@stage_command("infini-report", InfiniReportParams,
               help="Gather the Infini-attention line's metrics (val PPL per kind, "
                    "compressions curve, passkey, reversal) into one file for `newllm "
                    "report`.", reads_runs=("infini_runs", "adapter_runs"))
def infini_report(params: InfiniReportParams, *, infini_runs: RunNames,
                  adapter_runs: RunNames) -> None:
    """Reports every run of params groups `infini_runs` and `adapter_runs`."""
    folder = Path(params.metrics_dir)
    out: dict[str, Any] = {}
    base_ppl = read_json(Path(params.base_ppl))
    out["base__val_ppl"] = base_ppl["token_ppl"]
    base_rev = read_json(folder / "eval_reversal.json")
    # the base was never shown the pairs: its figures on the halves the trained models were
    # (and were not) shown are their untrained reference
    out.update(reversal_figures("base", base_rev))
    configs: dict[str, list[str]] = {}  # the runs of each configuration, over seeds
    for run in infini_runs:
        config = {k: v for k, v in infini_runs.changes[run].items() if k != "seed"}
        configs.setdefault(repr(sorted(config.items())), []).append(run)
    for runs in configs.values():
        trains = []
        for run in runs:  # every run: its training, memory probes and reversal figures
            train = read_json(folder / f"train_lm_{run}.json")
            trains.append(train)
            out.update({f"{run}__{k}": v for k, v in train_figures(train).items()})
            memory = read_json(folder / f"eval_memory_{run}.json")
            out.update({f"{run}__{k}": v for k, v in memory_figures(memory).items()})
            out.update(reversal_figures(run, read_json(folder / f"eval_reversal_{run}.json")))
        if len(runs) > 1:  # the spread over seeds, on the configuration's first run
            out.update({f"{runs[0]}__{k}": v for k, v in seed_figures(trains).items()})
    out.update(adapter_figures(Path(params.adapter_dir), adapter_runs,
                               params.reversal_adapter_runs))
    for key, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NewllmError(f"infini-report: {key} is {value}; a stage produced a "
                              "non-finite figure.")
    write_metrics(params.metrics, out)
    click.echo(f"infini-report: {len(out)} figures -> {params.metrics}")
