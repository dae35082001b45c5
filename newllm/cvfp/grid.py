"""seeds/003's comparison table, its ablations and the phase-1 objectives, rerun at one
shared token budget with several seeds.

Every configuration trains phase 1 on the same number of train tokens (split among its
blocks, or all of them for every block with `block_data: all`), computes the exact contexts
of the same train and val tokens in memory, and trains its TokenBlock on the same tokens
for the same epochs (shortlist training softmax, full-vocabulary val figures); everything
not named here is phase 1's and phase 2's default. Each seed draws its own blocks, its own
TokenBlock and its own batch order; the seeds of a configuration run in one process. The
seeds' figures (2M tokens on a GPU, GPT-2 embeddings) stand beside ours.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from newllm.core.stats import mean_sd
from newllm.core.train import TrainConfig
from newllm.cvfp.model import CVFPLM, CVFPConfig
from newllm.cvfp.phase1 import DIVERSITIES, Phase1Config, train_context_blocks
from newllm.cvfp.phase2 import train_token_block
from newllm.cvfp.recurrence import stream_contexts

DEFAULT_ROW = "blocks2_500"


@dataclass(frozen=True)
class GridConfig:
    model: dict[str, Any] = field(default_factory=dict)  # CVFPConfig fields
    phase1: dict[str, Any] = field(default_factory=dict)  # Phase1Config fields
    block_data: str = "split"
    init_context: str = "zeros"
    seed_val_ppl: float | None = None  # seeds/003's figure, if it gives one
    seed_val_accuracy: float | None = None
    note: str = ""


GRID: dict[str, GridConfig] = {
    DEFAULT_ROW: GridConfig({"num_blocks": 2, "context_dim": 500}, seed_val_ppl=111.9,
                            seed_val_accuracy=0.256,
                            note="2 blocks x 500 (the seeds' best), the phase-1 defaults"),
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
    "no_context_norm": GridConfig({"num_blocks": 2, "context_dim": 500, "context_norm": "none"},
                                  note="blocks2_500 without the LayerNorm on contexts"),
    **{f"diversity_{kind}": GridConfig({"num_blocks": 2, "context_dim": 500},
                                       {"diversity": kind},
                                       note=f"blocks2_500 with phase-1 diversity {kind}")
       for kind in DIVERSITIES},
}


@dataclass(frozen=True)
class Budget:
    phase1_tokens: int  # train tokens for phase 1, shared among a config's blocks
    phase1_batch_size: int  # positions per phase-1 optimizer step
    max_iterations: int
    train_tokens: int  # phase-2 train tokens
    val_tokens: int
    epochs: int
    batch_size: int
    lr: float
    shortlist: int  # phase-2 training softmax classes (0 = the full head)


def diversity_of(name: str) -> str:
    """The phase-1 objective a configuration trains with."""
    return GRID[name].phase1.get("diversity", Phase1Config().diversity)


def run_seed(name: str, embeddings: torch.Tensor, train_ids: torch.Tensor,
             val_ids: torch.Tensor, separator_id: int, budget: Budget, seed: int,
             device: torch.device, also_shortlists: tuple[int, ...] = ()
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Phase 1, the exact contexts and phase 2 for one configuration and seed: (its figures,
    phase 1's records per block and iteration). `also_shortlists`: phase 2 once more on the
    same blocks with each of these training heads (`val_ppl_shortlist<K>` in the figures)."""
    grid = GRID[name]
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = CVFPConfig(embeddings.shape[0], embeddings.shape[1], **grid.model)
    model = CVFPLM(config, embeddings)
    per_block = budget.phase1_tokens // config.num_blocks  # `all`: each block reads all
    phase1 = replace(Phase1Config(), max_iterations=budget.max_iterations,
                     batch_size=budget.phase1_batch_size, lipschitz_every_iteration=False,
                     **grid.phase1)
    records = train_context_blocks(
        model, train_ids[:budget.phase1_tokens], val_ids, phase1,
        tokens_per_block=per_block, block_data=grid.block_data,
        init_context=grid.init_context, generator=generator)
    train = (stream_contexts(model, train_ids[:budget.train_tokens], chunk_tokens=8192),
             train_ids[:budget.train_tokens])
    val = (stream_contexts(model, val_ids, chunk_tokens=8192), val_ids)
    trained, head_seconds = {}, {}
    for shortlist in (budget.shortlist, *also_shortlists):
        head_began = time.perf_counter()
        lm = copy.deepcopy(model)
        torch.manual_seed(seed)  # the same TokenBlock start and batch order for every head
        lm.token_block.reset_parameters()
        trained[shortlist] = train_token_block(
            lm, train, val, separator_id,
            TrainConfig("cvfp_grid", budget.epochs, budget.batch_size, budget.lr,
                        device=device),
            torch.Generator().manual_seed(seed), shortlist=shortlist, val_every_epoch=False)
        head_seconds[shortlist] = time.perf_counter() - head_began
    history = trained[budget.shortlist]
    last_records = [[r for r in records if r["block"] == b][-1]
                    for b in range(config.num_blocks)]
    figures = {
        "val_ppl": history[-1].val_ppl, "val_accuracy": history[-1].val_accuracy,
        "val_effective_rank_percent": sum(r["val_effective_rank_percent"]
                                          for r in last_records) / len(last_records),
        "fidelity_relative": max(r["fidelity_relative"] for r in last_records),
        "lipschitz_max": max(r["lipschitz_max"] for r in last_records),
        "phase1_steps": sum(r.get("steps", 0) for r in records),
        **{f"epoch{e.epoch}_train_loss": e.train_loss for e in history},
        **{f"val_ppl_shortlist{k}": h[-1].val_ppl for k, h in trained.items()},
        **{f"phase2_seconds_shortlist{k}": t for k, t in head_seconds.items()},
        "seconds": time.perf_counter() - began,
    }
    return figures, [{"seed": seed, **r} for r in records]


SUMMARIZED = ("val_ppl", "val_accuracy", "val_effective_rank_percent", "fidelity_relative",
              "lipschitz_max")


def run_config(name: str, embeddings: torch.Tensor, train_ids: torch.Tensor,
               val_ids: torch.Tensor, separator_id: int, budget: Budget, seeds: list[int],
               device: torch.device) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """Every seed of one configuration: (mean, sd and n of each figure with the seeds'
    values, per-seed figures, phase-1 records of every seed)."""
    per_seed, records = [], []
    for seed in seeds:
        figures, history = run_seed(name, embeddings, train_ids, val_ids, separator_id,
                                    budget, seed, device)
        per_seed.append({"seed": seed, **figures})
        records += history
    summary: dict[str, Any] = {"seeds": len(seeds), "diversity": diversity_of(name),
                               "context_dims": CVFPConfig(1, 1, **GRID[name].model)
                               .total_context_dim,
                               "seed_val_ppl": GRID[name].seed_val_ppl,
                               "seed_val_accuracy": GRID[name].seed_val_accuracy,
                               "seconds": sum(s["seconds"] for s in per_seed)}
    for key in SUMMARIZED:
        spread = mean_sd([s[key] for s in per_seed])
        summary[key] = spread["mean"]
        summary[f"{key}_sd"] = spread["sd"]
    return summary, per_seed, records


def compare_rows(rows: dict[str, dict[str, Any]], default: str = DEFAULT_ROW,
                 key: str = "val_ppl") -> dict[str, dict[str, Any]]:
    """Each row's difference from the default row in `key`'s mean, and whether it exceeds
    2 sd (the larger of the two rows' sample sd over seeds)."""
    base = rows[default]
    out = {}
    for name, row in rows.items():
        if name == default:
            continue
        difference = row[key] - base[key]
        threshold = 2 * max(row[f"{key}_sd"], base[f"{key}_sd"])
        out[name] = {"difference": difference, "threshold": threshold,
                     "differs": bool(abs(difference) > threshold)}
    return out


def choose_diversity(rows: dict[str, dict[str, Any]]) -> str:
    """The rule fixed before the runs (docs/cvfp.md): the objective with the lowest mean
    phase-2 val PPL over seeds among the configurations that differ only in it (the
    default row counts for the default objective)."""
    by_objective = {row["diversity"]: row["val_ppl"] for name, row in rows.items()
                    if name == DEFAULT_ROW or name.startswith("diversity_")}
    return min(by_objective, key=by_objective.get)
