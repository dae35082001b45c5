"""train-compressor: learn context hidden states -> k virtual tokens (hyper or qattn) by KL
distillation on every training pair, plus regression to e* where a pair has one.

Reads build-e-star's `train.safetensors` (fit: every pair's teacher top-K, a subset's e*) and
`val.safetensors` (per-epoch held-out loss). With `num_virtual` other than the e* set's k
there is no regression target and the KL (with any matches) is the whole loss. Only the
compressor trains: the base's in-memory weights are hashed before and after and must be
unchanged. Writes `<out_dir>/<name>/compressor.safetensors`, the metrics
`<metrics_dir>/<name>.json` and per-epoch losses `<plots_dir>/<name>.csv` (`name`: the run's,
by default its arch); eval-compressor compares the runs with e* and the controls on the
held-out pairs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.core.artifacts import atomic_dir, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.hidden import resolve_decoder_layers, resolve_layer_index
from newllm.core.params import as_dict, param
from newllm.core.runtime import seed_everything
from newllm.core.train import (
    COMPUTE_DTYPES,
    TrainConfig,
    Trainer,
    is_main_process,
    write_history_csv,
)
from newllm.virtual_tokens.compressor import (
    ARCHS,
    COMPRESSOR_FILE,
    Compressor,
    CompressorConfig,
    LossWeights,
    attention_targets,
    compressor_dir,
    compressor_loss,
    regression_rows,
    save_compressor,
)
from newllm.virtual_tokens.e_star import HIDDEN_LOSSES, load_e_star


@dataclass
class TrainCompressorParams:
    group = "train_compressor"
    e_star_dir: str = param("artifacts/e_star", "build-e-star's output folder (train and val "
                            "e* sets).")
    arch: str = param("hyper", "hyper: small transformer over [queries; context]; qattn: one "
                      "query-attention pooling layer.", choices=ARCHS)
    num_virtual: int | None = param(None, "Virtual tokens k the compressor emits (null = the "
                                    "e* set's k). With another k than the e* set's there is "
                                    "no regression target: it trains on the KL (and matches) "
                                    "alone.", min=1)
    num_heads: int = param(8, "Attention heads (must divide the embedding size).", min=1)
    hyper_num_layers: int = param(2, "Transformer layers of the hyper arch.", min=1)
    hyper_ffn_dim: int = param(2048, "Feed-forward width of the hyper arch.", min=1)
    kl_weight: float = param(1.0, "Weight of the KL of the base's next-token distributions "
                             "after [sep, predicted, follow] to the teacher's top-K.", min=0.0)
    kl_temperature: float = param(1.0, "Distillation temperature of the KL term.", min=1e-6)
    hidden_weight: float = param(0.0, "Weight of the hidden-state match on the follow "
                                 "positions (the layer build-e-star stored).", min=0.0)
    hidden_loss_index: int = param(-2, "Hidden state of the hidden-state match: an index of "
                                   "HF's hidden_states (0 = embeddings, -1 = last), not a "
                                   "decoder layer index; must be the one build-e-star stored "
                                   "(its hidden_loss_index).")
    hidden_loss_type: str = param("cosine_norm", "Hidden-state mismatch.",
                                  choices=HIDDEN_LOSSES)
    attn_weight: float = param(0.0, "Weight of the attention match to the teacher reading "
                               "the whole text, at the positions predicting the follow "
                               "tokens (0 = off).", min=0.0)
    attn_decoder_layers: list[int] = param([-1, -2], "Decoder layers of the attention "  # noqa: RUF009
                                           "match: decoder layer indices (0 = the first "
                                           "decoder layer, negative: from the last).")
    attn_use_weights: bool = param(False, "Match each head's attention distribution (pooled "
                                   "into separator / context / each follow token; KL) rather "
                                   "than the attention sublayer's output (hidden_loss_type).")
    epochs: int = param(2, "Passes over the training pairs.", min=1)
    batch_size: int = param(8, "Pairs per optimizer step.", min=1)
    lr: float = param(1e-3, "Adam learning rate (cosine-decayed to 0).", min=1e-12)
    compute_dtype: str = param("float32", "Training precision (bfloat16: autocast).",
                               choices=COMPUTE_DTYPES)
    seed: int = param(0, "Seed of the initialization and the batch order.", min=0)
    name: str | None = param(None, "Name of the run (null = the arch): the folder and file "
                             "names below.")
    out_dir: str = param("artifacts/compressors", "Output folder: writes "
                         "<out_dir>/<name>/compressor.safetensors.", output="container")
    metrics_dir: str = param("metrics/compressor", "Metrics folder: <metrics_dir>/<name>.json.",
                             output="container")
    plots_dir: str = param("plots/compressor", "Per-epoch train/val loss: "
                           "<plots_dir>/<name>.csv.", output="container")

    def check(self) -> None:
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
                                                       self.name):
            raise NewllmError(f"train_compressor.name must be a plain file name (letters, "
                              f"digits, _ . -, not starting with a dot), got {self.name!r}.")


@stage_command("train-compressor", BaseParams, TrainCompressorParams, runs="compressor_runs",
               help="Train a compressor (hyper or qattn) from build-e-star's context hidden "
                    "states to its e*: cosine + norm regression plus kl_weight x KL of the "
                    "frozen base's next-token distributions to the teacher's, optionally a "
                    "hidden-state match. Only the compressor trains.")
def train_compressor(base_params: BaseParams, params: TrainCompressorParams) -> None:
    base = base_params.load()
    info = base.info.as_dict()
    folder = Path(params.e_star_dir)
    train = load_e_star(folder / "train.safetensors", info)
    val = load_e_star(folder / "val.safetensors", info)
    extra = train.meta["extra"]
    hidden_layer = resolve_layer_index(params.hidden_loss_index, base.info.num_layers,
                                       "train_compressor.hidden_loss_index")
    if params.hidden_weight > 0 and hidden_layer != extra["hidden_layer_index"]:
        raise NewllmError(f"train_compressor.hidden_loss_index resolves to {hidden_layer} but "
                          f"{train.meta.get('stage')} stored the teacher's hidden states at "
                          f"{extra['hidden_layer_index']}; set them equal (or hidden_weight 0).")
    sep_id = int(extra["separator_token_id"])
    generator = seed_everything(params.seed)
    num_virtual = params.num_virtual or train.num_virtual
    regression = num_virtual == train.num_virtual
    config = CompressorConfig(params.arch, train.context_hidden.shape[-1],
                              train.e_star.shape[-1], num_virtual, params.num_heads,
                              params.hyper_num_layers, params.hyper_ffn_dim)
    if not regression and params.kl_weight == 0 and params.hidden_weight == 0 \
            and params.attn_weight == 0:
        raise NewllmError(f"train_compressor.num_virtual {num_virtual} differs from the e* "
                          f"set's {train.num_virtual}, so there is no regression target, and "
                          "kl_weight, hidden_weight and attn_weight are all 0: nothing to "
                          "train on.")
    compressor = Compressor(config)
    # the same start for every k: the mean optimized training e* (of whatever k it has)
    compressor.init_output(train.optimized_e_star())
    attn_layers = tuple(resolve_decoder_layers(params.attn_decoder_layers, base.info.num_layers,
                                               "train_compressor.attn_decoder_layers"))
    weights = LossWeights(params.kl_weight, params.kl_temperature, params.hidden_weight,
                          params.hidden_loss_type, params.attn_weight, attn_layers,
                          params.attn_use_weights)
    trainer = Trainer(TrainConfig("train_compressor", params.epochs, params.batch_size,
                                  params.lr, params.compute_dtype, device=base.device))
    device = trainer.device
    model = base.model.to(device)
    train_d, val_d = train.to(device), val.to(device)
    val_rows = torch.arange(len(val.texts), device=device)
    train_attn = val_attn = None
    if params.attn_weight > 0:  # the teacher's side of the attention match, read once
        train_attn, val_attn = (attention_targets(model, sep_id, d.texts, d.follows,
                                                  attn_layers, params.attn_use_weights,
                                                  params.batch_size) for d in (train_d, val_d))

    def loss_fn(module: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return compressor_loss(module, model, train_d, rows.to(device), sep_id, weights,
                               hidden_layer, device, train_attn)

    def evaluate(module: torch.nn.Module) -> float:
        return compressor_loss(module, model, val_d, val_rows, sep_id, weights, hidden_layer,
                               device, val_attn).item()

    frozen = freeze(model)
    start = time.perf_counter()
    run = params.name or params.arch
    history = trainer.fit(compressor, loss_fn, len(train.texts), generator, evaluate,
                          desc=f"train-compressor {run}")
    seconds = time.perf_counter() - start
    check_unchanged(model, frozen, "train-compressor")
    if not is_main_process():
        return
    compressor = compressor.float().eval()
    vector_metrics = {}
    if regression:
        with torch.no_grad():
            predicted = compressor(val_d.context_hidden, val_d.context_mask)
            vector_metrics = {
                "val_regression_loss": regression_rows(predicted, val_d.e_star).mean().item(),
                "val_cosine": torch.nn.functional.cosine_similarity(
                    predicted, val_d.e_star, dim=-1).mean().item()}
    with atomic_dir(compressor_dir(params.out_dir, run)) as out:
        save_compressor(out / COMPRESSOR_FILE, compressor, stage="train-compressor",
                        params=as_dict(base_params, params), base=info,
                        extra={"e_star": str(folder), "separator_token_id": sep_id,
                               "context_layer_index": extra["context_layer_index"]})
    write_history_csv(Path(params.plots_dir) / f"{run}.csv", history)
    metrics = {"run": run, "arch": params.arch, "num_virtual": config.num_virtual,
               "seed": params.seed, "train_pairs": len(train.texts),
               "regression_pairs": int(train.has_e_star.sum()) if regression else 0,
               "val_pairs": len(val.texts),
               "parameters": sum(p.numel() for p in compressor.parameters()),
               "epochs": params.epochs, "kl_weight": params.kl_weight,
               "attn_weight": params.attn_weight,
               "final_train_loss": history[-1].train_loss, "final_val_loss": history[-1].val_loss,
               **vector_metrics, "base_weights_unchanged": True, "seconds": round(seconds, 2)}
    write_metrics(Path(params.metrics_dir) / f"{run}.json", metrics)
    click.echo(f"train-compressor {run} ({params.arch}): {metrics['parameters']:,} "
               f"parameters, "
               f"train loss {history[-1].train_loss:.4f}, val loss {history[-1].val_loss:.4f}, "
               + (f"val cosine to e* {metrics['val_cosine']:.4f}; " if regression
                  else f"KL alone (no e* with k={num_virtual}); ")
               + f"base weights unchanged; {seconds:.1f}s")
