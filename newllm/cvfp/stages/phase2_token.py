"""phase2-token: train the CVFP TokenBlock (only it) on the cached contexts.

Example t: every block's cached contexts after token t (per layer for the E-variant) and
the embedding of token t predict token t+1. Context blocks frozen; embeddings frozen with
the head tied to them unless `freeze_embeddings` / `head` say otherwise. Per epoch: train
loss, val PPL and val accuracy (targets that are not the separator, as eval-ppl scores).
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
from newllm.core.train import COMPUTE_DTYPES, TrainConfig, is_main_process
from newllm.cvfp.cache import load_cache
from newllm.cvfp.checkpoint import blocks_hash, load_blocks, save_lm
from newllm.cvfp.model import HEADS
from newllm.cvfp.phase2 import parameter_counts, train_token_block


@dataclass
class Phase2TokenParams:
    group = "phase2_token"
    blocks: str = param("artifacts/cvfp/context_blocks.safetensors", "Phase-1 blocks artifact.")
    cache: str = param("artifacts/cvfp/context_cache", "phase2-prep-cache folder.")
    max_train_tokens: int | None = param(60000, "Train on the first this many cached train "
                                         "tokens (null = all cached).", min=2)
    max_val_tokens: int | None = param(10000, "Validate on the first this many cached val "
                                       "tokens (null = all cached).", min=2)
    epochs: int = param(2, "Passes over the train tokens.", min=1)
    batch_size: int = param(256, "Positions per optimizer step.", min=1)
    lr: float = param(1e-3, "Adam learning rate (cosine-decayed to 0).", min=1e-12)
    compute_dtype: str = param("float32", "float32, or bfloat16 autocast.",
                               choices=COMPUTE_DTYPES)
    head: str = param("tied_frozen", "tied_frozen: logits from the frozen input embeddings; "
                      "trainable: an untied head initialised from them.", choices=HEADS)
    freeze_embeddings: bool = param(True, "Keep the input embeddings frozen (seeds/003: "
                                    "val PPL 334 frozen vs 1189 trained).")
    seed: int = param(0, "Seed of the initialization and the batch order.", min=0)
    out: str = param("artifacts/cvfp/lm.safetensors", "The trained LM (blocks + token block).",
                     output="artifact")
    metrics: str = param("metrics/cvfp/phase2.json", "Metrics JSON to write.", output="metrics")
    plots: str = param("plots/cvfp/phase2.csv", "Per-epoch figures (CSV).", output="plot")


@stage_command("phase2-token", BaseParams, Phase2TokenParams,
               help="CVFP phase 2: train only the TokenBlock for next-token prediction from the "
                    "cached contexts of the frozen blocks; per-epoch val PPL and accuracy.")
def phase2_token(base_params: BaseParams, params: Phase2TokenParams) -> None:
    base = base_params.load()
    info = base.info.as_dict()
    embeddings = base.input_embeddings()
    model, _ = load_blocks(params.blocks, info, embeddings, head=params.head,
                           freeze_embeddings=params.freeze_embeddings)
    digest = blocks_hash(model)
    train = load_cache(params.cache, "train", digest, info, params.max_train_tokens)
    val = load_cache(params.cache, "val", digest, info, params.max_val_tokens)
    separator = separator_token_id(base.tokenizer, base_params.separator_token)
    generator = seed_everything(params.seed)
    model.token_block.reset_parameters()  # seeded by `seed`, whatever phase 1 drew before
    config = TrainConfig("phase2_token", params.epochs, params.batch_size, params.lr,
                         params.compute_dtype, device=base_params.device)
    history = train_token_block(model, train, val, separator, config, generator)
    if not is_main_process():
        return
    counts = parameter_counts(model)
    save_lm(Path(params.out), model.cpu(), params=as_dict(base_params, params), base=info,
            extra={"blocks": params.blocks, "separator_id": separator})  # atomic, + sidecar
    write_csv(params.plots, ["epoch", "train_loss", "val_loss", "val_ppl", "val_accuracy"],
              [[e.epoch, e.train_loss, e.val_loss, e.val_ppl, e.val_accuracy] for e in history])
    last = history[-1]
    write_metrics(params.metrics, {
        "train_tokens": len(train[1]), "val_tokens": len(val[1]), "epochs": params.epochs,
        "head": params.head, "freeze_embeddings": params.freeze_embeddings,
        "val_ppl": last.val_ppl, "val_accuracy": last.val_accuracy,
        "val_loss": last.val_loss, "train_loss": last.train_loss,
        **{f"epoch{e.epoch}_val_ppl": e.val_ppl for e in history},
        **{f"epoch{e.epoch}_val_accuracy": e.val_accuracy for e in history},
        **counts,
    })
    for e in history:
        click.echo(f"epoch {e.epoch}: train loss {e.train_loss:.4f}, val PPL {e.val_ppl:.2f}, "
                   f"val accuracy {100 * e.val_accuracy:.2f}%")
    click.echo(f"parameters: {counts['parameters_total']:,} total, "
               f"{counts['parameters_trainable']:,} trainable")
