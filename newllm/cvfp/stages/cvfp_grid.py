"""cvfp-grid: one configuration of seeds/003's table or its ablations at the shared token
budget (dvc.yaml runs every one of cvfp_grid_runs.configs as a matrix)."""

from __future__ import annotations

from dataclasses import dataclass

import click

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.core.runtime import seed_everything
from newllm.core.tokens import separator_token_id
from newllm.cvfp.checkpoint import token_stream
from newllm.cvfp.grid import GRID, Budget, run_config


@dataclass
class CvfpGridParams:
    group = "cvfp_grid"
    data: str = param("data/prepared", "Prepared data folder (from prepare-data).")
    config: str = param("blocks2_500", "Configuration to run, one of: " + ", ".join(GRID)
                        + ".")
    phase1_tokens: int = param(3000, "Phase-1 train tokens per configuration (shared among "
                               "its blocks).", min=2)
    max_iterations: int = param(5, "Phase-1 parallel iterations.", min=1)
    train_tokens: int = param(6000, "Phase-2 train tokens per configuration.", min=2)
    val_tokens: int = param(3000, "Val tokens for phase-1 ranks and phase-2 PPL.", min=2)
    epochs: int = param(1, "Phase-2 epochs.", min=1)
    batch_size: int = param(256, "Phase-2 positions per step.", min=1)
    lr: float = param(1e-3, "Phase-2 Adam learning rate.", min=1e-12)
    seed: int = param(0, "Seed of every configuration.", min=0)
    metrics_dir: str = param("metrics/cvfp/grid", "Metrics JSON <config>.json in here: "
                             "<config>__val_ppl, ...", output="container")
    plots_dir: str = param("plots/cvfp/grid", "Plots CSV <config>.csv in here (one row).",
                           output="container")


COLUMNS = ["val_ppl", "val_accuracy", "seed_val_ppl", "seed_val_accuracy",
           "val_effective_rank_percent", "lipschitz_max", "context_dims", "seconds"]


@stage_command("cvfp-grid", BaseParams, CvfpGridParams,
               help="CVFP: rerun seeds/003's configuration table (blocks x layers x width) and "
                    "its ablations (inherited contexts, all data per block, trained "
                    "embeddings, no context norm) at one token budget; val PPL and accuracy "
                    "beside the seed's figures.")
def cvfp_grid(base_params: BaseParams, params: CvfpGridParams) -> None:
    if params.config not in GRID:
        raise NewllmError(f"cvfp_grid.config: unknown configuration '{params.config}'; "
                          f"expected one of {', '.join(GRID)}.")
    base = base_params.load()
    embeddings = base.input_embeddings()
    separator = separator_token_id(base.tokenizer, base_params.separator_token)
    seed_everything(params.seed)
    data = base.info.tokenizer_only()
    budget = Budget(params.phase1_tokens, params.train_tokens, params.val_tokens,
                    params.epochs, params.batch_size, params.lr, params.max_iterations)
    train_ids = token_stream(params.data, "train", separator, data,
                             max(params.phase1_tokens, params.train_tokens))
    val_ids = token_stream(params.data, "val", separator, data, params.val_tokens)
    name = params.config
    result = run_config(name, embeddings, train_ids, val_ids, separator, budget, params.seed,
                        base.device)
    click.echo(f"{name}: val PPL {result['val_ppl']:.1f} (seed {result['seed_val_ppl']}), val "
               f"accuracy {100 * result['val_accuracy']:.2f}%, {result['seconds']:.0f} s")
    write_metrics(f"{params.metrics_dir}/{name}.json", {
        f"{name}__{key}": value for key, value in {
            "phase1_tokens": params.phase1_tokens, "train_tokens": params.train_tokens,
            "val_tokens": params.val_tokens, "epochs": params.epochs, **result}.items()
        if value is not None})  # the seed gives no figure
    write_csv(f"{params.plots_dir}/{name}.csv", ["config", *COLUMNS],
              [[name, *[result[c] for c in COLUMNS]]])
