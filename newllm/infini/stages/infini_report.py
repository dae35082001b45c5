"""infini-report: the Infini-attention line's figures gathered into one metrics file.

Reads the metrics the line's stages wrote into `metrics_dir` (train_lm_<run>.json,
eval_ppl_<kind>.json, eval_memory_<run>.json, eval_reversal[_<kind>].json) and the base's
eval-ppl metrics, and writes one flat file keyed `<row>__<figure>`: a row per trained kind,
a row per delta-rule/ALiBi ablation run and the base model, as `newllm report` shows them.
The adapter runs on the pretrained base (train-infini-adapter-*, in `adapter_dir`) add the
rows adapter-base (the base read in the adapter's segments), adapter-parallel (with its
eval-reversal), adapter-frozen and adapter-replace.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from newllm.core.artifacts import write_metrics
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import comma_names, param


@dataclass
class InfiniReportParams:
    group = "infini_report"
    metrics_dir: str = param("metrics/infini", "Folder of the line's metrics files.")
    kinds: str = param("pythia,infini,multi_memory,hierarchical", "Comma-separated trained "
                       "kinds (infini_runs.kinds).")
    ablations: str = param("delta-false_alibi-false,delta-false_alibi-true,"
                           "delta-true_alibi-true", "Comma-separated ablation runs (the names "
                           "of infini_runs.ablations).")
    base_ppl: str = param("metrics/eval_ppl.json", "The base model's eval-ppl metrics.")
    adapter_dir: str = param("metrics/infini_adapter", "Folder of train-infini-adapter's "
                             "metrics (parallel, frozen, replace) and eval-reversal's on the "
                             "parallel model.")
    metrics: str = param("metrics/infini_report.json", "Metrics JSON to write.")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NewllmError(f"{path} does not exist; run the stage that writes it "
                          "(dvc repro).") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise NewllmError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise NewllmError(f"{path}: expected a JSON object of metrics.")
    return data


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


def adapter_figures(folder: Path) -> dict[str, Any]:
    """Rows of the memory-on-the-base runs. Their val PPL reads the first val documents in
    the adapter's segments (`segmented_val_ppl`), not eval-ppl's whole split."""
    parallel = read_json(folder / "parallel.json")
    frozen = read_json(folder / "frozen.json")
    replace = read_json(folder / "replace.json")
    rev = read_json(folder / "eval_reversal_parallel.json")
    out: dict[str, Any] = {"adapter-base__segmented_val_ppl": parallel["base_val_ppl"]}
    for row, run in (("adapter-parallel", parallel), ("adapter-frozen", frozen)):
        out[f"{row}__segmented_val_ppl"] = run["val_ppl"]
        out[f"{row}__alpha"] = run["alpha"]
        out[f"{row}__train_tokens"] = run["train_tokens"]
    out.update(reversal_figures("adapter-parallel", rev))
    out["adapter-replace__after_distill_val_ppl"] = replace["after_distill_val_ppl"]
    out["adapter-replace__segmented_val_ppl"] = replace["val_ppl"]
    out["adapter-replace__distill_error_held_out"] = replace["distill_error_held_out"]
    return out


@stage_command("infini-report", InfiniReportParams,
               help="Gather the Infini-attention line's metrics (val PPL per kind, "
                    "compressions curve, passkey, reversal) into one file for `newllm "
                    "report`.")
def infini_report(params: InfiniReportParams) -> None:
    folder = Path(params.metrics_dir)
    out: dict[str, Any] = {}
    base_ppl = read_json(Path(params.base_ppl))
    out["base__val_ppl"] = base_ppl["token_ppl"]
    base_rev = read_json(folder / "eval_reversal.json")
    # the base was never shown the pairs: its figures on the halves the trained models were
    # (and were not) shown are their untrained reference
    out.update(reversal_figures("base", base_rev))
    for kind in comma_names(params.kinds, "infini_report.kinds"):
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
    for run in comma_names(params.ablations, "infini_report.ablations"):
        train = read_json(folder / f"train_lm_infini_{run}.json")
        memory = read_json(folder / f"eval_memory_infini_{run}.json")
        row = f"infini_{run}"
        out[f"{row}__train_val_ppl"] = train["val_ppl"]
        out.update({f"{row}__{k}": v for k, v in memory_figures(memory).items()})
    out.update(adapter_figures(Path(params.adapter_dir)))
    for key, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NewllmError(f"infini-report: {key} is {value}; a stage produced a "
                              "non-finite figure.")
    write_metrics(params.metrics, out)
    click.echo(f"infini-report: {len(out)} figures -> {params.metrics}")
