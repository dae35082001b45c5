"""seeds/003's comparison table and its ablations, rerun at one shared token budget.

Every configuration trains phase 1 on the same number of train tokens (split among its
blocks, or all of them for every block with `block_data: all`), caches contexts for the
same train and val tokens in memory with the exact recurrence, and trains its TokenBlock on
the same tokens for the same epochs; everything not named here is phase 1's and phase 2's
default. The seeds' figures (2M tokens on a GPU, GPT-2 embeddings) stand beside ours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from newllm.core.train import TrainConfig
from newllm.cvfp.model import CVFPLM, CVFPConfig
from newllm.cvfp.phase1 import Phase1Config, train_context_blocks
from newllm.cvfp.phase2 import train_token_block
from newllm.cvfp.recurrence import stream_contexts


@dataclass(frozen=True)
class GridConfig:
    model: dict[str, Any] = field(default_factory=dict)  # CVFPConfig fields
    block_data: str = "split"
    init_context: str = "zeros"
    seed_val_ppl: float | None = None  # seeds/003's figure, if it gives one
    seed_val_accuracy: float | None = None
    note: str = ""


GRID: dict[str, GridConfig] = {
    "blocks2_500": GridConfig({"num_blocks": 2, "context_dim": 500}, seed_val_ppl=111.9,
                              seed_val_accuracy=0.256, note="2 blocks x 500 (the seeds' best)"),
    "c1t1_500": GridConfig({"num_blocks": 1, "context_dim": 500}, seed_val_ppl=127.2,
                           seed_val_accuracy=0.247, note="1 block, 1+1 layers, 500"),
    "c2t2_500": GridConfig({"num_blocks": 1, "context_layers": 2, "token_layers": 2,
                            "context_dim": 500}, seed_val_ppl=132.2, seed_val_accuracy=0.244,
                           note="1 block, 2+2 layers (E-variant), 500"),
    "c1t1_1000": GridConfig({"num_blocks": 1, "context_dim": 1000}, seed_val_ppl=134.0,
                            seed_val_accuracy=0.236, note="1 block, 1+1 layers, 1000"),
    "inherit": GridConfig({"num_blocks": 2, "context_dim": 500}, init_context="inherit",
                          seed_val_ppl=119.5, note="blocks2_500, block 2 inherits block 1's "
                                                   "context"),
    "block_data_all": GridConfig({"num_blocks": 2, "context_dim": 500}, block_data="all",
                                 note="blocks2_500, every block on all phase-1 tokens"),
    "trainable_embeddings": GridConfig(
        {"num_blocks": 2, "context_dim": 500, "freeze_embeddings": False, "head": "trainable"},
        note="blocks2_500 with trained embeddings and an untied trained head (seeds/003: "
             "1189 trained vs 334 frozen, tied, in another setting)"),
    "no_context_norm": GridConfig({"num_blocks": 2, "context_dim": 500, "context_norm": "none"},
                                  note="blocks2_500 without the LayerNorm on contexts"),
}


@dataclass(frozen=True)
class Budget:
    phase1_tokens: int  # train tokens for phase 1, shared among a config's blocks
    train_tokens: int  # phase-2 train tokens
    val_tokens: int
    epochs: int
    batch_size: int
    lr: float
    max_iterations: int


def run_config(name: str, embeddings: torch.Tensor, train_ids: torch.Tensor,
               val_ids: torch.Tensor, separator_id: int, budget: Budget, seed: int,
               device: torch.device) -> dict[str, Any]:
    """Phase 1, the exact contexts and phase 2 for one configuration; its figures."""
    grid = GRID[name]
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = CVFPConfig(embeddings.shape[0], embeddings.shape[1], **grid.model)
    model = CVFPLM(config, embeddings)
    per_block = budget.phase1_tokens // config.num_blocks  # `all`: each block reads all
    records = train_context_blocks(
        model, train_ids[:budget.phase1_tokens], val_ids,
        replace(Phase1Config(), max_iterations=budget.max_iterations),
        tokens_per_block=per_block, block_data=grid.block_data,
        init_context=grid.init_context, generator=generator)
    train = (stream_contexts(model, train_ids[:budget.train_tokens], chunk_tokens=8192),
             train_ids[:budget.train_tokens])
    val = (stream_contexts(model, val_ids, chunk_tokens=8192), val_ids)
    history = train_token_block(
        model, train, val, separator_id,
        TrainConfig("cvfp_grid", budget.epochs, budget.batch_size, budget.lr, device=device),
        generator)
    last_records = [[r for r in records if r["block"] == b][-1]
                    for b in range(config.num_blocks)]
    return {
        "val_ppl": history[-1].val_ppl, "val_accuracy": history[-1].val_accuracy,
        "seed_val_ppl": grid.seed_val_ppl, "seed_val_accuracy": grid.seed_val_accuracy,
        "val_effective_rank_percent": sum(r["val_effective_rank_percent"]
                                          for r in last_records) / len(last_records),
        "lipschitz_max": max(r["lipschitz_max"] for r in last_records),
        "context_dims": config.total_context_dim,
        "seconds": time.perf_counter() - began,
    }
