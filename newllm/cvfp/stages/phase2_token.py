"""phase2-token: train the CVFP TokenBlock (only it) on the cached contexts, with controls.

Example t: every block's cached contexts after token t (per layer for the E-variant) and
the embedding of token t predict token t+1. Context blocks frozen; embeddings frozen with
the head tied to them unless `freeze_embeddings` / `head` say otherwise.

Beside the real contexts (`cvfp`), the same TokenBlock is trained at the same budget on
each of `controls`: `zeros` (no contexts: a bigram model on e_t), `shuffled` (another
position's contexts of the same split) and `untrained` (the contexts of phase 1's blocks
before any phase-1 step: does phase 1 matter?), every one for every seed. Per variant: val
PPL and accuracy (the val stream, full head) and the token PPL eval-ppl would give
(documents separately, each read whole from a fresh context) on the first val documents,
as mean and sd over seeds. The LM of the first seed on the real contexts is written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.data import load_split
from newllm.core.errors import NewllmError
from newllm.core.params import as_dict, param
from newllm.core.ppl import evaluate_ppl
from newllm.core.runtime import seed_everything
from newllm.core.stats import mean_sd
from newllm.core.tokens import separator_token_id
from newllm.core.train import COMPUTE_DTYPES, TrainConfig, is_main_process
from newllm.cvfp.cache import load_cache
from newllm.cvfp.checkpoint import blocks_hash, load_blocks, save_lm
from newllm.cvfp.model import CVFPLM, HEADS
from newllm.cvfp.phase2 import control_contexts, parameter_counts, train_token_block
from newllm.cvfp.recurrence import stream_contexts
from newllm.cvfp.scorer import CVFPScorer

CONTROLS = ("zeros", "shuffled", "untrained")
FIGURES = ("val_ppl", "val_accuracy", "eval_token_ppl")


@dataclass
class Phase2TokenParams:
    group = "phase2_token"
    blocks: str = param("artifacts/cvfp/context_blocks.safetensors", "Phase-1 blocks artifact.")
    untrained_blocks: str = param("artifacts/cvfp/context_blocks_untrained.safetensors",
                                  "The same blocks before phase 1 (control `untrained`).")
    cache: str = param("artifacts/cvfp/context_cache", "phase2-prep-cache folder.")
    data: str = param("data/prepared", "Prepared data folder (val documents for the "
                      "eval-ppl figure).")
    max_train_tokens: int | None = param(12000, "Train on the first this many cached train "
                                         "tokens (null = all cached).", min=2)
    max_val_tokens: int | None = param(5000, "Validate on the first this many cached val "
                                       "tokens (null = all cached).", min=2)
    eval_tokens: int = param(3000, "eval-ppl's token PPL (documents separately) on the first "
                             "val documents up to this many tokens, for every run.", min=2)
    epochs: int = param(2, "Passes over the train tokens.", min=1)
    batch_size: int = param(128, "Positions per optimizer step.", min=1)
    lr: float = param(1e-3, "Adam learning rate (cosine-decayed to 0).", min=1e-12)
    shortlist: int = param(4096, "Training softmax: the most frequent train targets plus one "
                           "class for the rest (0, or >= the vocabulary: the full head); val "
                           "figures always use the full head.", min=0)
    compute_dtype: str = param("float32", "float32, or bfloat16 autocast.",
                               choices=COMPUTE_DTYPES)
    head: str = param("tied_frozen", "tied_frozen: logits from the frozen input embeddings; "
                      "trainable: an untied head initialised from them.", choices=HEADS)
    freeze_embeddings: bool = param(True, "Keep the input embeddings frozen (seeds/003: "
                                    "val PPL 334 frozen vs 1189 trained).")
    seeds: list[int] = param([0, 1, 2], "Seeds of the TokenBlock's initialization and batch "  # noqa: RUF009
                             "order; the LM of the first is written.")
    controls: list[str] = param(list(CONTROLS), "Context controls trained beside the real "  # noqa: RUF009
                                "contexts: zeros, shuffled, untrained.")
    out: str = param("artifacts/cvfp/lm.safetensors", "The trained LM (blocks + token block).",
                     output="artifact")
    metrics: str = param("metrics/cvfp/phase2.json", "Metrics JSON to write.", output="metrics")
    plots: str = param("plots/cvfp/phase2.csv", "Per-epoch figures of the written LM (CSV).",
                       output="plot")
    runs: str = param("plots/cvfp/phase2_runs.csv", "Every variant and seed's figures (CSV).",
                      output="plot")


def check_controls(controls: list[str]) -> None:
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown or len(set(controls)) != len(controls):
        raise NewllmError(f"phase2_token.controls must be distinct values of "
                          f"{', '.join(CONTROLS)}, got {controls}.")


@stage_command("phase2-token", BaseParams, Phase2TokenParams,
               help="CVFP phase 2: train only the TokenBlock for next-token prediction from the "
                    "cached contexts of the frozen blocks, over several seeds, beside the same "
                    "TokenBlock on zero, shuffled and untrained-block contexts; val PPL, "
                    "accuracy and eval-ppl's token PPL per variant.")
def phase2_token(base_params: BaseParams, params: Phase2TokenParams) -> None:
    check_controls(params.controls)
    if not params.seeds:
        raise NewllmError("phase2_token.seeds is empty; expected at least one seed.")
    base = base_params.load()
    info = base.info.as_dict()
    embeddings = base.input_embeddings()
    model, _ = load_blocks(params.blocks, info, embeddings, head=params.head,
                           freeze_embeddings=params.freeze_embeddings)
    digest = blocks_hash(model)
    train = load_cache(params.cache, "train", digest, info, params.max_train_tokens)
    val = load_cache(params.cache, "val", digest, info, params.max_val_tokens)
    separator = separator_token_id(base.tokenizer, base_params.separator_token)
    docs, texts = load_split(params.data, "val", base=base.info.tokenizer_only()).documents(
        params.eval_tokens)
    variants: dict[str, tuple[CVFPLM, tuple, tuple]] = {"cvfp": (model, train, val)}
    for control in params.controls:
        if control == "untrained":
            untrained, meta = load_blocks(params.untrained_blocks, info, embeddings,
                                          head=params.head,
                                          freeze_embeddings=params.freeze_embeddings)
            if not meta["extra"].get("untrained") or untrained.config != model.config:
                raise NewllmError(f"{params.untrained_blocks} is not the untrained twin of "
                                  f"{params.blocks}; re-run phase1-context.")
            variants[control] = (untrained,
                                 (stream_contexts(untrained, train[1], chunk_tokens=8192),
                                  train[1]),
                                 (stream_contexts(untrained, val[1], chunk_tokens=8192), val[1]))
        else:
            variants[control] = (model, (control_contexts(train[0], control), train[1]),
                                 (control_contexts(val[0], control, seed=1), val[1]))
    config = TrainConfig("phase2_token", params.epochs, params.batch_size, params.lr,
                         params.compute_dtype, device=base_params.device)
    runs, written = [], None
    for name, (blocks, train_v, val_v) in variants.items():
        for seed in params.seeds:
            generator = seed_everything(seed)
            lm = copy.deepcopy(blocks)
            lm.token_block.reset_parameters()  # seeded by `seed`, whatever came before
            history = train_token_block(lm, train_v, val_v, separator, config, generator,
                                        shortlist=params.shortlist,
                                        val_every_epoch=name == "cvfp" and seed == params.seeds[0])
            scorer = CVFPScorer(lm.eval(), torch.device(base.device), base.info, separator,
                                "", contexts="zeros" if name == "zeros" else
                                "shuffled" if name == "shuffled" else "cvfp")
            result = evaluate_ppl(scorer, docs, texts, separator, 0, 0, 1)
            runs.append({"variant": name, "seed": seed, "val_ppl": history[-1].val_ppl,
                         "val_accuracy": history[-1].val_accuracy,
                         "eval_token_ppl": result.token_ppl, "eval_tokens": result.tokens,
                         "train_loss": history[-1].train_loss})
            click.echo(f"{name} seed {seed}: val PPL {history[-1].val_ppl:.1f}, accuracy "
                       f"{100 * history[-1].val_accuracy:.2f}%, eval-ppl token PPL "
                       f"{result.token_ppl:.1f}")
            if written is None:
                written = (lm, history)
    if not is_main_process():
        return
    lm, history = written
    counts = parameter_counts(lm)
    save_lm(Path(params.out), lm.cpu(), params=as_dict(base_params, params), base=info,
            extra={"blocks": params.blocks, "separator_id": separator,
                   "seed": params.seeds[0]})  # atomic, + sidecar
    write_csv(params.plots, ["epoch", "train_loss", "val_loss", "val_ppl", "val_accuracy"],
              [[e.epoch, e.train_loss, e.val_loss, e.val_ppl, e.val_accuracy] for e in history])
    columns = ["variant", "seed", "val_ppl", "val_accuracy", "eval_token_ppl", "eval_tokens",
               "train_loss"]
    write_csv(params.runs, columns, [[r[c] for c in columns] for r in runs])
    last = history[-1]
    metrics = {
        "train_tokens": len(train[1]), "val_tokens": len(val[1]), "epochs": params.epochs,
        "eval_tokens": runs[0]["eval_tokens"], "shortlist": params.shortlist,
        "seeds": len(params.seeds), "head": params.head,
        "freeze_embeddings": params.freeze_embeddings,
        "val_ppl": last.val_ppl, "val_accuracy": last.val_accuracy,
        "val_loss": last.val_loss, "train_loss": last.train_loss,
        **{f"epoch{e.epoch}_val_ppl": e.val_ppl for e in history},
        **{f"epoch{e.epoch}_val_accuracy": e.val_accuracy for e in history},
        **counts,
    }
    for name in variants:
        for key in FIGURES:
            spread = mean_sd([r[key] for r in runs if r["variant"] == name])
            metrics[f"{name}__{key}"] = spread["mean"]
            metrics[f"{name}__{key}_sd"] = spread["sd"]
    write_metrics(params.metrics, metrics)
    for name in variants:
        click.echo(f"{name}: val PPL {metrics[f'{name}__val_ppl']:.1f} ± "
                   f"{metrics[f'{name}__val_ppl_sd']:.1f}, accuracy "
                   f"{100 * metrics[f'{name}__val_accuracy']:.2f}% over {len(params.seeds)} "
                   "seeds")
    click.echo(f"parameters: {counts['parameters_total']:,} total, "
               f"{counts['parameters_trainable']:,} trainable")
