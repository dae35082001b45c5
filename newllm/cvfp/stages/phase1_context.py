"""phase1-context: train the CVFP context blocks (seeds/001, seeds/003), each on its own slice.

Writes the blocks (the phase-2 model's frozen half), the same blocks before any phase-1
step (phase 2's "untrained" control), and, per block and iteration, the losses, the
convergence rate, the fixed-point fidelity (the parallel iteration's contexts against the
exact recurrence on the training slice), the effective rank of validation contexts and the
Lipschitz estimate of the update in c.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.params import as_dict, param
from newllm.core.runtime import seed_everything
from newllm.core.tokens import separator_token_id
from newllm.cvfp.checkpoint import save_blocks, token_stream
from newllm.cvfp.model import CONTEXT_NORMS, CVFPLM, CVFPConfig
from newllm.cvfp.phase1 import (
    BLOCK_DATA,
    CVFP_TARGETS,
    DIVERSITIES,
    INIT_CONTEXTS,
    INITS,
    Phase1Config,
    block_slices,
    train_context_blocks,
)


@dataclass
class Phase1Params:
    group = "phase1_context"
    data: str = param("data/prepared", "Prepared data folder (from prepare-data).")
    num_blocks: int = param(2, "Context blocks, each trained on its own slice; their contexts "
                            "are concatenated for the TokenBlock.", min=1)
    context_layers: int = param(1, "Layers per context block.", min=1)
    token_layers: int = param(1, "TokenBlock layers (must equal context_layers: layer i reads "
                              "context layer i).", min=1)
    context_dim: int = param(500, "Context width per block.", min=1)
    context_norm: str = param("layernorm", "layernorm: LayerNorm (no affine) after each "
                              "context layer; none: c' = c + ReLU(W[c,e]+b) as written.",
                              choices=CONTEXT_NORMS)
    tokens_per_block: int = param(6000, "Train-stream tokens per block.", min=2)
    block_data: str = param("split", "split: block i trains on tokens [i*n, (i+1)*n); all: "
                            "every block on [0, num_blocks*n).", choices=BLOCK_DATA)
    init_context: str = param("zeros", "zeros, or inherit: block i starts from block i-1's "
                              "last training context.", choices=INIT_CONTEXTS)
    init: str = param("sequential", "Iteration 0: one sequential pass (no learning), or "
                      "small noise.", choices=INITS)
    max_iterations: int = param(10, "Parallel iterations after iteration 0.", min=1)
    batch_size: int = param(300, "Positions per optimizer step (tokens_per_block / batch_size "
                            "steps per iteration).", min=1)
    lr: float = param(1e-3, "Adam learning rate.", min=1e-12)
    diversity: str = param("oacd", "oacd (seeds/003), dispersion (seeds/001), oacd_prenorm "
                           "(OACD of the states before the context norm) or decorrelation "
                           "(OACD + 1/PR - 1/d of the batch covariance).", choices=DIVERSITIES)
    centroid_weight: float = param(0.1, "OACD's weight on ||mean||^2.", min=0)
    cvfp_weight: float = param(0.0, "Weight of MSE(contexts, target).", min=0)
    diversity_weight: float = param(1.0, "Weight of the diversity term.", min=0)
    cvfp_target: str = param("previous", "previous iteration's contexts, or the first "
                             "(iteration 0) held fixed.", choices=CVFP_TARGETS)
    convergence_threshold: float = param(0.1, "A token has converged when its MSE to the "
                                         "previous iteration is below this.", min=0)
    convergence_target: float = param(0.95, "Stop once this share of tokens has converged.",
                                      min=0, max=1)
    val_tokens: int = param(1000, "Validation contexts (exact, sequential) for the effective "
                            "rank.", min=2)
    lipschitz_samples: int = param(64, "States sampled for the Lipschitz estimate.", min=1)
    seed: int = param(0, "Seed of the initialization and the noise.", min=0)
    out: str = param("artifacts/cvfp/context_blocks.safetensors", "Blocks artifact to write.",
                     output="artifact")
    untrained_out: str = param("artifacts/cvfp/context_blocks_untrained.safetensors",
                               "The blocks as initialised, before any phase-1 step.",
                               output="artifact")
    metrics: str = param("metrics/cvfp/phase1.json", "Metrics JSON to write.",
                         output="metrics")
    plots: str = param("plots/cvfp/phase1.csv", "Per block and iteration figures (CSV).",
                       output="plot")

    def config(self) -> Phase1Config:
        return Phase1Config(self.max_iterations, self.batch_size, self.lr, self.init,
                            self.diversity, self.centroid_weight, self.cvfp_weight,
                            self.diversity_weight, self.cvfp_target,
                            self.convergence_threshold, self.convergence_target,
                            self.lipschitz_samples)


PLOT_COLUMNS = ["block", "iteration", "steps", "loss", "cvfp_loss", "diversity_loss",
                "convergence_rate", "fidelity_mse", "fidelity_relative", "val_effective_rank",
                "val_effective_rank_percent", "lipschitz_max", "lipschitz_mean",
                "val_context_norm"]


@stage_command("phase1-context", BaseParams, Phase1Params,
               help="CVFP phase 1: train each context block on its own slice of the train "
                    "stream with the parallel shifted-previous-context iteration (fixed-point "
                    "+ diversity loss); report effective rank, convergence and Lipschitz "
                    "estimates.")
def phase1_context(base_params: BaseParams, params: Phase1Params) -> None:
    base = base_params.load()
    info = base.info.as_dict()
    embeddings = base.input_embeddings()
    separator = separator_token_id(base.tokenizer, base_params.separator_token)
    generator = seed_everything(params.seed)
    model = CVFPLM(CVFPConfig(embeddings.shape[0], embeddings.shape[1], params.num_blocks,
                              params.context_layers, params.token_layers, params.context_dim,
                              params.context_norm), embeddings)
    train_ids = token_stream(params.data, "train", separator, base.info.tokenizer_only())
    val_ids = token_stream(params.data, "val", separator, base.info.tokenizer_only(),
                           params.val_tokens)
    # The token budget is checked before the untrained blocks are written: a run that
    # cannot train must leave nothing behind.
    block_slices(params.num_blocks, params.tokens_per_block, params.block_data, len(train_ids))
    save_blocks(Path(params.untrained_out), model, params=as_dict(base_params, params),
                base=info, extra={"separator_id": separator, "untrained": True})
    records = train_context_blocks(model, train_ids, val_ids, params.config(),
                                   tokens_per_block=params.tokens_per_block,
                                   block_data=params.block_data,
                                   init_context=params.init_context, generator=generator)
    save_blocks(Path(params.out), model, params=as_dict(base_params, params), base=info,
                extra={"separator_id": separator})  # atomic, with its .json sidecar
    write_csv(params.plots, PLOT_COLUMNS,
              [[r.get(k, "") for k in PLOT_COLUMNS] for r in records])
    metrics = {"num_blocks": params.num_blocks, "context_dim": params.context_dim,
               "context_norm": params.context_norm, "tokens_per_block": params.tokens_per_block}
    for block in range(params.num_blocks):
        history = [r for r in records if r["block"] == block]
        first, last = history[0], history[-1]
        metrics.update({
            f"block{block}_iterations": last["iteration"],
            f"block{block}_val_effective_rank": last["val_effective_rank"],
            f"block{block}_val_rank_dims": last["val_rank_dims"],
            f"block{block}_val_effective_rank_percent": last["val_effective_rank_percent"],
            f"block{block}_initial_val_effective_rank_percent":
                first["val_effective_rank_percent"],
            f"block{block}_convergence_rate": last.get("convergence_rate"),
            f"block{block}_final_loss": last.get("loss"),
            f"block{block}_final_cvfp_loss": last.get("cvfp_loss"),
            f"block{block}_final_diversity_loss": last.get("diversity_loss"),
            f"block{block}_fidelity_mse": last.get("fidelity_mse"),
            f"block{block}_fidelity_relative": last.get("fidelity_relative"),
            f"block{block}_steps_per_iteration": last.get("steps"),
            f"block{block}_lipschitz_max": last["lipschitz_max"],
            f"block{block}_lipschitz_mean": last["lipschitz_mean"],
        })
    metrics["diversity"] = params.diversity
    write_metrics(params.metrics, metrics)
    for block in range(params.num_blocks):
        click.echo(f"block {block}: val effective rank "
                   f"{metrics[f'block{block}_val_effective_rank']:.1f}/{params.context_dim} "
                   f"({metrics[f'block{block}_val_effective_rank_percent']:.1f}%), convergence "
                   f"{metrics[f'block{block}_convergence_rate']:.3f}, fidelity "
                   f"{metrics[f'block{block}_fidelity_relative']:.3f} (relative), Lipschitz max "
                   f"{metrics[f'block{block}_lipschitz_max']:.3f}")
