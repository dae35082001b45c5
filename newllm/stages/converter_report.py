"""converter-report: one table of held-out token recovery per layer, from train-converter metrics.

Reads every `layer<L>_<model_type>.json` in the train-converter metrics folder
and writes a flat metrics JSON (`layer15_linear_top1`, `layer15_identity_top1`,
...) and a CSV with one row per layer for `dvc plots` (top-1 vs layer).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from newllm.artifacts import write_csv, write_metrics
from newllm.cli import stage_command
from newllm.errors import NewllmError
from newllm.params import param

METRICS_FILE = re.compile(r"layer(\d+)_([a-z]+)\.json")
STATS = ("mse", "cosine", "top1")


@dataclass
class ConverterReportParams:
    group = "converter_report"
    converters: str = param("metrics/converter", "Folder of train-converter metrics "
                            "(layer<L>_<model_type>.json).")
    metrics: str = param("metrics/converter_report.json", "Flat metrics JSON to write.")
    plot: str = param("plots/converter_by_layer.csv", "CSV to write: one row per layer.")


def read_converter_metrics(folder: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """{layer: {model_type: metrics}} from a folder of train-converter metrics files."""
    if not folder.is_dir():
        raise NewllmError(f"converter_report.converters '{folder}' is not a folder; run "
                          "train-converter first.")
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.iterdir()):
        match = METRICS_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match[1]), {})[match[2]] = json.loads(path.read_text())
    if not found:
        raise NewllmError(f"converter_report.converters '{folder}' holds no "
                          "layer<L>_<model_type>.json files; run train-converter first.")
    return found


def layer_rows(found: dict[int, dict[str, dict[str, Any]]]
               ) -> tuple[list[str], list[str], dict[int, dict[str, dict[str, float]]]]:
    """The variants (model types, then identity), the statistics, and
    {layer: {variant: {stat: value}}}."""
    types = sorted({t for by_type in found.values() for t in by_type})
    topks = {m["topk"] for by_type in found.values() for m in by_type.values()}
    if len(topks) != 1:
        raise NewllmError(f"the train-converter metrics use different topk values {sorted(topks)}; "
                          "re-run train-converter with one train_converter.topk.")
    stats = [*STATS, f"top{topks.pop()}"]
    table: dict[int, dict[str, dict[str, float]]] = {}
    for layer, by_type in sorted(found.items()):
        table[layer] = {t: {s: m[f"val_{s}"] for s in stats} for t, m in by_type.items()}
        # The identity baseline depends only on the pairs and the split, not on the model type;
        # disagreeing files mean one of them is stale.
        identities = {json.dumps({s: m[f"identity_{s}"] for s in stats}) for m in by_type.values()}
        if len(identities) != 1:
            raise NewllmError(f"the layer{layer}_*.json metrics disagree on the identity baseline "
                              "(made from different pairs or splits); re-run train-converter "
                              "for that layer.")
        table[layer]["identity"] = json.loads(identities.pop())
    return [*types, "identity"], stats, table


@stage_command("converter-report", ConverterReportParams,
               help="Collect train-converter metrics of every layer into one flat metrics JSON "
                    "and a per-layer CSV (top-1 recovery vs layer for dvc plots).")
def converter_report(params: ConverterReportParams) -> None:
    variants, stats, table = layer_rows(read_converter_metrics(Path(params.converters)))
    metrics = {f"layer{layer}_{variant}_{stat}": row[variant][stat]
               for layer, row in table.items() for variant in row for stat in stats}
    header = ["layer"] + [f"{v}_{s}" for s in stats for v in variants]
    rows = [[layer] + [f"{row[v][s]:.6g}" if v in row else "" for s in stats for v in variants]
            for layer, row in table.items()]
    write_metrics(params.metrics, metrics)
    write_csv(params.plot, header, rows)
    widths = [max(len(h), 8) for h in header]
    click.echo("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        click.echo("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
