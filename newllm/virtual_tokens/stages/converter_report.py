"""converter-report: one table of held-out token recovery per layer, from train-converter metrics.

Reads exactly `layer<L>_<model_type>.json` for each layer and model type of params group
`per_layer` (the ones dvc.yaml's extract-pairs / train-converter matrix runs) in the
train-converter metrics folder, so a layer dropped from the pipeline does not linger in
the report, and writes
a flat metrics JSON (`layer15_linear_top1`, `layer15_identity_top1`, ...) and a CSV with
one row per layer for `dvc plots` (top-1 vs layer).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from newllm.core.artifacts import read_json_object, write_csv, write_metrics
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.virtual_tokens import run_name
from newllm.virtual_tokens.converter import MODEL_TYPES

STATS = ("mse", "cosine", "top1")


@dataclass
class PerLayerParams:
    """The grid of the extract-pairs / train-converter matrix, read by converter-report."""

    group = "per_layer"
    # param() gives a list default a default_factory, so instances never share it
    layers: list[int] = param([1, 15, 30], "Hidden states of the pairs and converters: indices "  # noqa: RUF009
                              "of HF's hidden_states (0 = embeddings), non-negative (they name "
                              "the output folders); each needs a file for every model type.",
                              min=0)
    model_types: list[str] = param(["linear", "mlp"], "Converter types trained for every "  # noqa: RUF009
                                   "layer.", choices=MODEL_TYPES)

    def check(self) -> None:
        for key in ("layers", "model_types"):
            values = getattr(self, key)
            if not values:
                raise NewllmError(f"per_layer.{key} is empty; list at least one.")
            if len(set(values)) != len(values):
                raise NewllmError(f"per_layer.{key} {values} names one twice.")


@dataclass
class ConverterReportParams:
    group = "converter_report"
    converters: str = param("metrics/converter", "Folder of train-converter metrics "
                            "(layer<L>_<model_type>.json).")
    metrics: str = param("metrics/converter_report.json", "Flat metrics JSON to write.",
                         output="metrics")
    plot: str = param("plots/converter_by_layer.csv", "CSV to write: one row per layer.",
                      output="plot")


def _read_metrics_file(path: Path, layer: int, model_type: str) -> dict[str, Any]:
    """One train-converter metrics file, checked to hold what the report reads."""
    if not path.is_file():
        raise NewllmError(f"{path} does not exist; run `dvc repro train-converter` (or `newllm "
                          f"train-converter --hidden-index {layer} --model-type {model_type}`).")
    data = read_json_object(path, "a train-converter metrics JSON (re-run train-converter)")
    topk = data.get("topk")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise NewllmError(f"{path} has no integer 'topk'; it is not a train-converter metrics "
                          "file of this version (re-run train-converter).")
    for prefix in ("val", "identity"):
        for stat in (*STATS, f"top{topk}"):
            value = data.get(f"{prefix}_{stat}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                    not math.isfinite(value):
                raise NewllmError(f"{path} has no finite number '{prefix}_{stat}'; it is not a "
                                  "train-converter metrics file of this version (re-run "
                                  "train-converter).")
    return data


def read_converter_metrics(folder: Path, layers: list[int], model_types: list[str]
                           ) -> dict[int, dict[str, dict[str, Any]]]:
    """{layer: {model_type: metrics}} from exactly `layer<L>_<type>.json` of each layer, type."""
    if not folder.is_dir():
        raise NewllmError(f"converter_report.converters '{folder}' is not a folder; run "
                          "train-converter first.")
    return {layer: {t: _read_metrics_file(folder / f"{run_name(layer, t)}.json", layer, t)
                    for t in model_types}
            for layer in sorted(layers)}


def layer_rows(found: dict[int, dict[str, dict[str, Any]]]
               ) -> tuple[list[str], list[str], dict[int, dict[str, dict[str, float]]]]:
    """The variants (model types, then identity), the statistics, and
    {layer: {variant: {stat: value}}}."""
    types = list(next(iter(found.values())))
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


@stage_command("converter-report", ConverterReportParams, PerLayerParams,
               help="Collect the train-converter metrics of the layers and model types of "
                    "per_layer into one flat metrics JSON and a per-layer CSV (top-1 recovery "
                    "vs layer for dvc plots).")
def converter_report(params: ConverterReportParams, per_layer: PerLayerParams) -> None:
    found = read_converter_metrics(Path(params.converters), per_layer.layers,
                                   per_layer.model_types)
    variants, stats, table = layer_rows(found)
    metrics = {f"{run_name(layer, variant)}_{stat}": row[variant][stat]
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
