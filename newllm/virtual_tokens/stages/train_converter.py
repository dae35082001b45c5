"""train-converter: learn hidden state -> token embedding (MSE) and evaluate it on held-out tokens.

The metrics file holds, on the held-out tokens, the converter's MSE, mean
cosine and top-1 / top-k recovery of the original token by nearest neighbour
over the full embedding matrix, next to the same figures for the identity map
(the raw hidden state as the query, a logit-lens style reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.core.artifacts import atomic_dir, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.hidden import resolve_layer_index
from newllm.core.params import as_dict, param
from newllm.core.runtime import seed_everything
from newllm.core.train import COMPUTE_DTYPES, is_main_process, write_history_csv
from newllm.virtual_tokens import run_name
from newllm.virtual_tokens.converter import (
    CONVERTER_FILE,
    MODEL_TYPES,
    Converter,
    ConverterConfig,
    converter_dir,
    save_converter,
)
from newllm.virtual_tokens.fit import fit_converter, split_by_token
from newllm.virtual_tokens.pairs import PAIRS_FILE, load_pairs, pairs_dir
from newllm.virtual_tokens.recovery import mapping_metrics


@dataclass
class TrainConverterParams:
    group = "train_converter"
    pairs_dir: str = param("artifacts/pairs", "Folder of extract-pairs outputs: reads "
                           "<pairs_dir>/layer<L>/pairs.safetensors.")
    hidden_index: int = param(-1, "Hidden state whose pairs to learn from: an index of HF's "
                              "hidden_states as extract-pairs took it (0 = embeddings, -1 = "
                              "last), not a decoder layer index.")
    model_type: str = param("linear", "Converter architecture.", choices=MODEL_TYPES)
    hidden_dim: int = param(1024, "Hidden width of the mlp converter.", min=1)
    epochs: int = param(30, "Passes over the training pairs.", min=1)
    batch_size: int = param(256, "Pairs per optimizer step.", min=1)
    lr: float = param(1e-3, "Adam learning rate (cosine-decayed to 0).", min=1e-12)
    val_fraction: float = param(0.2, "Share of token ids held out for evaluation.", min=0.01,
                                max=0.9)
    compute_dtype: str = param("float32", "Training precision: bfloat16 runs the forward and "
                               "backward under autocast (weights stay float32).",
                               choices=COMPUTE_DTYPES)
    seed: int = param(0, "Seed of the split, the initialization and the batch order.", min=0)
    topk: int = param(5, "k of the top-k token recovery.", min=1)
    out_dir: str = param("artifacts/converters", "Output folder: writes "
                         "<out_dir>/layer<L>_<model_type>/converter.safetensors.",
                         output="container")
    metrics_dir: str = param("metrics/converter", "Metrics folder: writes "
                             "<metrics_dir>/layer<L>_<model_type>.json.", output="container")
    plots_dir: str = param("plots/converter", "Plots folder: writes per-epoch train/val loss "
                           "to <plots_dir>/layer<L>_<model_type>.csv.", output="container")


@stage_command("train-converter", BaseParams, TrainConverterParams,
               help="Learn X -> Y (hidden state -> input embedding) from extract-pairs output with "
                    "a linear or MLP converter (MSE), holding out a share of token ids; report "
                    "held-out MSE, cosine and nearest-token recovery, with the identity map as "
                    "a baseline.")
def train_converter(base_params: BaseParams, params: TrainConverterParams) -> None:
    base = base_params.load()
    layer = resolve_layer_index(params.hidden_index, base.info.num_layers,
                                "train_converter.hidden_index")
    pairs = load_pairs(pairs_dir(params.pairs_dir, layer) / PAIRS_FILE, base.info.as_dict())
    generator = seed_everything(params.seed)
    train_rows, val_rows = split_by_token(pairs.token_ids, params.val_fraction, generator)
    x, y, ids = pairs.x, pairs.y, pairs.token_ids

    converter = Converter(ConverterConfig(params.model_type, x.shape[1], y.shape[1],
                                          params.hidden_dim))
    history = fit_converter(converter, x[train_rows], y[train_rows], x[val_rows], y[val_rows],
                            epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
                            generator=generator, compute_dtype=params.compute_dtype,
                            device=base.device)
    if not is_main_process():  # under `accelerate launch` one process writes the outputs
        return

    embeddings = base.input_embeddings()
    with torch.no_grad():
        predicted = converter(x[val_rows])
        fitted = converter(x[train_rows])
    held_out = mapping_metrics(predicted, y[val_rows], ids[val_rows], embeddings, params.topk)
    identity = mapping_metrics(x[val_rows], y[val_rows], ids[val_rows], embeddings, params.topk)
    train_fit = mapping_metrics(fitted, y[train_rows], ids[train_rows], embeddings, params.topk)

    name = run_name(layer, params.model_type)
    with atomic_dir(converter_dir(params.out_dir, layer, params.model_type)) as out:
        save_converter(out / CONVERTER_FILE, converter, stage="train-converter",
                       params=as_dict(base_params, params), base=base.info.as_dict(),
                       layer=layer, prefix_id=pairs.prefix_id,
                       tensors={"val_token_ids": ids[val_rows]},
                       extra={"pairs": str(pairs.artifact.path), "val_metrics": held_out})
    write_history_csv(Path(params.plots_dir) / f"{name}.csv", history)
    metrics = {
        "layer_index": layer, "model_type": params.model_type,
        "prefix_token_id": -1 if pairs.prefix_id is None else pairs.prefix_id,
        "train_tokens": len(train_rows), "val_tokens": len(val_rows), "topk": params.topk,
        "epochs": params.epochs, "compute_dtype": params.compute_dtype,
        "final_train_loss": history[-1].train_loss, "final_val_loss": history[-1].val_loss,
        **{f"val_{k}": v for k, v in held_out.items()},
        **{f"identity_{k}": v for k, v in identity.items()},
        **{f"train_{k}": v for k, v in train_fit.items() if k.startswith("top")},
    }
    write_metrics(Path(params.metrics_dir) / f"{name}.json", metrics)
    k = params.topk
    click.echo(f"{name}: held-out {len(val_rows)} tokens: MSE {held_out['mse']:.5f}, cosine "
               f"{held_out['cosine']:.4f}, top-1 {held_out['top1']:.4f}, top-{k} "
               f"{held_out[f'top{k}']:.4f} (identity: cosine {identity['cosine']:.4f}, top-1 "
               f"{identity['top1']:.4f}, top-{k} {identity[f'top{k}']:.4f})")
