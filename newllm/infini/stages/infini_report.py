"""infini-report: the Infini-attention line's figures gathered into one metrics file.

The runs come from params.yaml, not a copy: every run of `infini_runs` (train-lm's) and of
`adapter_runs` (train-infini-adapter's). Reads the metrics the line's stages wrote into
`metrics_dir` (train_lm_<run>.json, eval_memory_<run>.json and, for a kind run,
eval_ppl_<run>.json and eval_reversal_<run>.json; eval_reversal.json of the base) and the
base's eval-ppl metrics, and writes one flat file keyed `<row>__<figure>`, the row being the
run's name: a full row for each run that changes only `kind`, a row of train val PPL and
memory probes for each other run (the delta-rule / ALiBi ablations), and the base model, as
`newllm report` shows them. The adapter runs on the pretrained base (`adapter_dir`:
<run>.json, eval_reversal_<run>.json of `reversal_adapter_runs`) add the rows adapter-base
(the base read in the adapter's segments) and adapter-<run>.
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


@dataclass
class InfiniReportParams:
    group = "infini_report"
    metrics_dir: str = param("metrics/infini", "Folder of the line's metrics files.")
    base_ppl: str = param("metrics/eval_ppl.json", "The base model's eval-ppl metrics.")
    adapter_dir: str = param("metrics/infini_adapter", "Folder of train-infini-adapter's "
                             "metrics (<run>.json of each adapter_runs run) and eval-reversal's "
                             "(eval_reversal_<run>.json).")
    reversal_adapter_runs: list[str] = param(  # noqa: RUF009 (param copies the list)
        ["parallel"], "Runs of adapter_runs that eval-reversal read.")
    metrics: str = param("metrics/infini_report.json", "Metrics JSON to write.", output="metrics")


def read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "a metrics JSON file",
                            "run the stage that writes it (dvc repro)")


REVERSAL_KEYS = ("forward_ppl", "backward_ppl", "reversal_ratio", "forward_rank_accuracy",
                 "backward_rank_accuracy")


def reversal_figures(row: str, reversal: dict[str, Any]) -> dict[str, Any]:
    """`row`'s injected / never-injected figures from an eval-reversal metrics file."""
    return {f"{row}__{prefix}{k}": reversal[prefix + k] for prefix in ("injected_", "control_")
            for k in REVERSAL_KEYS if prefix + k in reversal}


def memory_figures(memory: dict[str, Any]) -> dict[str, Any]:
    after = sorted(int(k.rsplit("_", 1)[1]) for k in memory if k.startswith("ppl_after_"))
    fillers = sorted(int(k.rsplit("_", 1)[1]) for k in memory if k.startswith("passkey_after_"))
    out: dict[str, Any] = {f"ppl_after_{n}": memory[f"ppl_after_{n}"] for n in after}
    out["ppl_after_0"] = memory["ppl_after_0"]
    out["ppl_after_max"] = memory[f"ppl_after_{after[-1]}"]
    out["compressions_max"] = after[-1]
    out["passkey_max_fillers"] = fillers[-1]
    out["passkey_at_max"] = memory[f"passkey_after_{fillers[-1]}"]
    out["passkey_mean"] = sum(memory[f"passkey_after_{n}"] for n in fillers) / len(fillers)
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
    kinds = [run for run in infini_runs if set(infini_runs.changes[run]) == {"kind"}]
    for kind in kinds:  # a run of a kind with train_lm's settings: the full row
        train = read_json(folder / f"train_lm_{kind}.json")
        ppl = read_json(folder / f"eval_ppl_{kind}.json")
        rev = read_json(folder / f"eval_reversal_{kind}.json")
        out[f"{kind}__parameters"] = train["parameters"]
        out[f"{kind}__train_tokens"] = train["train_tokens"]
        out[f"{kind}__val_ppl"] = ppl["token_ppl"]
        out[f"{kind}__train_val_ppl"] = train["val_ppl"]
        out[f"{kind}__val_ppl_flag"] = train["val_ppl_flag"]
        out.update(reversal_figures(kind, rev))
        memory = read_json(folder / f"eval_memory_{kind}.json")
        out.update({f"{kind}__{k}": v for k, v in memory_figures(memory).items()})
    for row in (run for run in infini_runs if run not in kinds):  # the ablations
        train = read_json(folder / f"train_lm_{row}.json")
        memory = read_json(folder / f"eval_memory_{row}.json")
        out[f"{row}__train_val_ppl"] = train["val_ppl"]
        out.update({f"{row}__{k}": v for k, v in memory_figures(memory).items()})
    out.update(adapter_figures(Path(params.adapter_dir), adapter_runs,
                               params.reversal_adapter_runs))
    for key, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NewllmError(f"infini-report: {key} is {value}; a stage produced a "
                              "non-finite figure.")
    write_metrics(params.metrics, out)
    click.echo(f"infini-report: {len(out)} figures -> {params.metrics}")
