"""cvfp-grid-summary: the grid's rows side by side, each against the default row, and the
phase-1 objective the rule fixed in docs/cvfp.md picks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from newllm.core.artifacts import read_json_object, write_csv, write_metrics
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.cvfp.grid import DEFAULT_ROW, GRID, choose_diversity, compare_rows
from newllm.cvfp.phase1 import Phase1Config

FIGURES = ("val_ppl", "val_ppl_sd", "val_accuracy", "val_accuracy_sd",
           "val_effective_rank_percent", "fidelity_relative", "diversity", "seeds",
           "seed_val_ppl", "seed_val_accuracy")


@dataclass
class CvfpGridSummaryParams:
    group = "cvfp_grid_summary"
    metrics_dir: str = param("metrics/cvfp/grid", "cvfp-grid's metrics folder: every "
                             "<config>.json of a grid row in it is read (" + DEFAULT_ROW +
                             " must be there).")
    metrics: str = param("metrics/cvfp/grid_summary.json", "Metrics JSON to write: per row "
                         "<config>__..., and the objective the rule picks.", output="metrics")
    plots: str = param("plots/cvfp/grid_summary.csv", "One row per configuration (CSV).",
                       output="plot")


def read_rows(folder: str) -> dict[str, dict]:
    """Every grid row's metrics in `folder`, the default row first."""
    names = [name for name in GRID if (Path(folder) / f"{name}.json").is_file()]
    if DEFAULT_ROW not in names:
        raise NewllmError(f"{Path(folder) / DEFAULT_ROW}.json does not exist; run cvfp-grid "
                          f"--config {DEFAULT_ROW} first (every row is compared with it).")
    rows = {}
    for name in [DEFAULT_ROW, *(n for n in names if n != DEFAULT_ROW)]:
        path = Path(folder) / f"{name}.json"
        found = read_json_object(path, "a cvfp-grid metrics file")
        prefix = f"{name}__"
        rows[name] = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}
        if "val_ppl_sd" not in rows[name]:
            raise NewllmError(f"{path} has no {prefix}val_ppl_sd; re-run cvfp-grid.")
    return rows


@stage_command("cvfp-grid-summary", CvfpGridSummaryParams,
               help="CVFP: the grid's rows beside the default (difference in mean val PPL, "
                    "and whether it exceeds 2 sd over seeds) and the phase-1 objective with "
                    "the lowest mean val PPL.")
def cvfp_grid_summary(params: CvfpGridSummaryParams) -> None:
    rows = read_rows(params.metrics_dir)
    comparison = compare_rows(rows)
    chosen = choose_diversity(rows)
    default = Phase1Config().diversity
    metrics: dict = {"default_diversity": default, "rule_picks_diversity": chosen,
                     "rule_agrees_with_default": chosen == default}
    for name, row in rows.items():
        for key in FIGURES:
            if row.get(key) is not None:
                metrics[f"{name}__{key}"] = row[key]
        if name in comparison:
            c = comparison[name]
            metrics[f"{name}__vs_default"] = (
                f"{c['difference']:+.1f} ({'beyond' if c['differs'] else 'within'} 2 sd "
                f"= {c['threshold']:.1f})")
            metrics[f"{name}__differs_from_default"] = c["differs"]
    write_metrics(params.metrics, metrics)
    header = ["config", "val_ppl", "val_ppl_sd", "val_accuracy", "val_accuracy_sd",
              "difference", "differs"]
    write_csv(params.plots, header, [
        [name, row["val_ppl"], row["val_ppl_sd"], row["val_accuracy"], row["val_accuracy_sd"],
         comparison.get(name, {}).get("difference", 0.0),
         comparison.get(name, {}).get("differs", False)] for name, row in rows.items()])
    for name, row in rows.items():
        click.echo(f"{name}: val PPL {row['val_ppl']:.1f} ± {row['val_ppl_sd']:.1f}"
                   + (f", {metrics[f'{name}__vs_default']}" if name in comparison else ""))
    click.echo(f"phase-1 objective by the rule: {chosen} (default: {default})")
