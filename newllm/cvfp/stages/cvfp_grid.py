"""cvfp-grid: one configuration of seeds/003's table, its ablations or the phase-1
objectives at the shared token budget, every seed in one process (dvc.yaml runs every one
of cvfp_grid_runs.configs as a matrix; cvfp-grid-summary compares them)."""

from __future__ import annotations

from dataclasses import dataclass

import click

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams, load_tokenizer
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.core.runtime import resolve_device, seed_everything
from newllm.core.tokens import separator_token_id
from newllm.cvfp.checkpoint import read_input_embeddings, token_stream
from newllm.cvfp.grid import GRID, SUMMARIZED, Budget, run_config


@dataclass
class CvfpGridParams:
    group = "cvfp_grid"
    data: str = param("data/prepared", "Prepared data folder (from prepare-data).")
    config: str = param("blocks2_500", "Configuration to run, one of: " + ", ".join(GRID)
                        + ".")
    phase1_tokens: int = param(4000, "Phase-1 train tokens per configuration (shared among "
                               "its blocks).", min=2)
    phase1_batch_size: int = param(100, "Phase-1 positions per optimizer step (a block of "
                                   "phase1_tokens / blocks tokens takes that / this steps "
                                   "per iteration).", min=1)
    max_iterations: int = param(5, "Phase-1 parallel iterations.", min=1)
    train_tokens: int = param(6000, "Phase-2 train tokens per configuration.", min=2)
    val_tokens: int = param(2000, "Val tokens for phase-1 ranks and phase-2 PPL.", min=2)
    epochs: int = param(2, "Phase-2 epochs.", min=1)
    batch_size: int = param(128, "Phase-2 positions per step.", min=1)
    lr: float = param(1e-3, "Phase-2 Adam learning rate.", min=1e-12)
    shortlist: int = param(0, "Phase-2 training softmax: the most frequent train targets "
                           "plus one class for the rest (0, or >= the vocabulary: the full "
                           "head); val figures always use the full head.", min=0)
    seeds: list[int] = param([0, 1, 2], "Seeds of every configuration (blocks, TokenBlock, "  # noqa: RUF009
                             "batch order), run one after the other in one process.")
    metrics_dir: str = param("metrics/cvfp/grid", "Metrics JSON <config>.json in here: "
                             "<config>__val_ppl (mean over seeds), <config>__val_ppl_sd, ...",
                             output="container")
    plots_dir: str = param("plots/cvfp/grid", "Plots CSV <config>.csv in here (one row: the "
                           "means).", output="container")
    runs_dir: str = param("plots/cvfp/grid_runs", "<config>.csv: every seed's figures; "
                          "<config>_phase1.csv: phase 1 per seed, block and iteration.",
                          output="container")


COLUMNS = ["val_ppl", "val_ppl_sd", "val_accuracy", "val_accuracy_sd",
           "val_effective_rank_percent", "fidelity_relative", "lipschitz_max", "context_dims",
           "seeds", "seconds"]
SEED_COLUMNS = ["seed", "val_ppl", "val_accuracy", "val_effective_rank_percent",
                "fidelity_relative", "lipschitz_max", "phase1_steps", "epoch1_train_loss",
                "last_train_loss", "seconds"]
PHASE1_COLUMNS = ["seed", "block", "iteration", "steps", "loss", "diversity_loss",
                  "convergence_rate", "val_effective_rank_percent", "fidelity_mse",
                  "fidelity_relative", "lipschitz_max"]


@stage_command("cvfp-grid", BaseParams, CvfpGridParams,
               help="CVFP: rerun one configuration of seeds/003's table (blocks x layers x "
                    "width), its ablations (inherited contexts, all data per block, no context "
                    "norm) or a phase-1 diversity objective at one token budget, over several "
                    "seeds; val PPL and accuracy (mean and sd) beside the seed's figures.")
def cvfp_grid(base_params: BaseParams, params: CvfpGridParams) -> None:
    if params.config not in GRID:
        raise NewllmError(f"cvfp_grid.config: unknown configuration '{params.config}'; "
                          f"expected one of {', '.join(GRID)}.")
    if not params.seeds:
        raise NewllmError("cvfp_grid.seeds is empty; expected at least one seed.")
    tokenizer, info = load_tokenizer(base_params.model)
    embeddings = read_input_embeddings(base_params.model)
    device = resolve_device(base_params.device)
    if embeddings is None:  # not one model.safetensors: load the whole base for its rows
        base = base_params.load()
        embeddings, device = base.input_embeddings(), base.device
    separator = separator_token_id(tokenizer, base_params.separator_token)
    seed_everything(params.seeds[0])
    data = info.tokenizer_only()
    budget = Budget(params.phase1_tokens, params.phase1_batch_size, params.max_iterations,
                    params.train_tokens, params.val_tokens, params.epochs, params.batch_size,
                    params.lr, params.shortlist)
    train_ids = token_stream(params.data, "train", separator, data,
                             max(params.phase1_tokens, params.train_tokens))
    val_ids = token_stream(params.data, "val", separator, data, params.val_tokens)
    name = params.config
    summary, per_seed, records = run_config(name, embeddings, train_ids, val_ids, separator,
                                            budget, params.seeds, device)
    click.echo(f"{name}: val PPL {summary['val_ppl']:.1f} ± {summary['val_ppl_sd']:.1f} over "
               f"{len(params.seeds)} seeds (seed's {summary['seed_val_ppl']}), val accuracy "
               f"{100 * summary['val_accuracy']:.2f}%, {summary['seconds']:.0f} s")
    write_metrics(f"{params.metrics_dir}/{name}.json", {
        f"{name}__{key}": value for key, value in {
            "phase1_tokens": params.phase1_tokens, "train_tokens": params.train_tokens,
            "val_tokens": params.val_tokens, "epochs": params.epochs,
            "shortlist": params.shortlist, **summary,
            **{f"seed{s['seed']}_{k}": s[k] for s in per_seed for k in SUMMARIZED}}.items()
        if value is not None})  # the seed gives no figure
    write_csv(f"{params.plots_dir}/{name}.csv", ["config", *COLUMNS],
              [[name, *[summary[c] for c in COLUMNS]]])
    for s in per_seed:
        s["last_train_loss"] = s[f"epoch{params.epochs}_train_loss"]
    write_csv(f"{params.runs_dir}/{name}.csv", ["config", *SEED_COLUMNS],
              [[name, *[s[c] for c in SEED_COLUMNS]] for s in per_seed])
    write_csv(f"{params.runs_dir}/{name}_phase1.csv", ["config", *PHASE1_COLUMNS],
              [[name, *[r.get(c, "") for c in PHASE1_COLUMNS]] for r in records])
