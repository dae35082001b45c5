"""train-infini-adapter: compressive memory on the pretrained base (seeds/004), `parallel`
(layer0 + α·adapter, α = 0 at start, full or frozen-base fine-tuning) or `replace` (distil an
Infini layer from layer 0, then fine-tune with per-group learning rates).

All PPLs here read the val documents in segments of `segment_length` with the memory
carried (the base, without memory, is read the same way, so the figures compare); the
metrics also hold the base's PPL read this way before any change. In `parallel`, step 0
is checked against the base on the first val document's logits (max |difference|, 0 when
α = 0 leaves the base exactly), not by a second pass over the whole val text.

The artifact (kind `infini-adapter`) holds every weight that moved: the whole model after
full fine-tuning, the adapter and α alone with a frozen base; eval-reversal / eval-ppl read
it as model kind `infini-adapter`. With `reversal_facts`, the injected / never-injected
pairs are recorded in it, as train-lm does.

It runs on the machine's usual torch threads: on an idle 2-core machine two threads take
this stage from 56 to 47 s (and eval-reversal on its model from 53 to 38 s); on a machine
already busy with other work one thread can be much faster (`OMP_NUM_THREADS=1`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import click
import torch

from newllm.core.artifacts import save_artifact, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.data import load_split
from newllm.core.errors import NewllmError
from newllm.core.hidden import decoder_of
from newllm.core.params import as_dict, param
from newllm.core.ppl import build_stream
from newllm.core.reversal import FORMATS, SHIPPED, inject_facts
from newllm.core.runtime import seed_everything
from newllm.core.tokens import separator_token_id
from newllm.infini.adapter import (
    ADAPTER_KIND,
    MODES,
    InfiniLayer,
    attach_parallel,
    attach_replace,
    distill,
    distill_error,
    finetune,
    memory_config,
    parameter_groups,
    segmented_logits,
    segmented_ppl,
    trained_weights,
)
from newllm.infini.memory import MEMORY_GRADIENTS
from newllm.infini.training import make_sequences, training_stream


@dataclass
class TrainInfiniAdapterParams:
    group = "train_infini_adapter"
    mode: str = param("parallel", "parallel: layer0 + α·adapter (α = 0 at start); replace: "
                      "distil an Infini layer from layer 0, then fine-tune.", choices=MODES)
    freeze_base_model: bool = param(False, "parallel: train only the adapter and α.")
    data: str = param("data/prepared", "Prepared data folder.")
    use_delta_rule: bool = param(True, "Delta-rule memory update.")
    use_alibi: bool = param(False, "ALiBi decay over segments in memory.")
    memory_gradient: str = param("sequence", "What gradients cross segments: sequence = "
                                 "through the memory across a sequence's segments, none = "
                                 "the seed's detached write.", choices=MEMORY_GRADIENTS)
    d_ff: int = param(1536, "replace: MLP width of the Infini layer.", min=1)
    segment_length: int = param(64, "Tokens per segment.", min=2)
    segments_per_sequence: int = param(4, "Segments per training sequence.", min=1)
    max_train_tokens: int = param(1024, "Training tokens.", min=2)
    val_max_tokens: int = param(512, "Val tokens for the PPLs (whole documents).", min=1)
    batch_size: int = param(1, "Sequences per step.", min=1)
    distill_epochs: int = param(1, "replace: distillation epochs (the seed: 10).", min=0)
    distill_lr: float = param(1e-3, "replace: distillation learning rate (the seed: 1e-4).",
                              min=1e-12)
    finetune_epochs: int = param(1, "LM fine-tuning epochs (the seed: 20).", min=0)
    finetune_lr: float = param(1e-5, "Base fine-tuning learning rate (the seed: 1e-5).",
                               min=1e-12)
    layer0_lr_scale: float = param(10.0, "Learning-rate factor of layer 0 (Infini layer / "
                                   "adapter and α).", min=0.0)
    other_lr_scale: float = param(1.0, "Learning-rate factor of embeddings, layers 1.. and "
                                  "the final norm / head.", min=0.0)
    reversal_facts: str | None = param(SHIPPED, "Pairs file whose forward sentences (of "
                                       "reversal_inject_fraction of the pairs) join the "
                                       "fine-tuning stream ('shipped' = the package's own; "
                                       "null = none).")
    reversal_format: str = param("csv", "Format of reversal_facts.", choices=FORMATS)
    reversal_inject_fraction: float = param(0.5, "Share of the pairs whose forward sentence "
                                            "is injected (as train_lm's); the rest are the "
                                            "never-injected control.", min=0.0, max=1.0)
    reversal_repeats: int = param(2, "Times each injected sentence appears.", min=1)
    seed: int = param(0, "Seed.", min=0)
    out: str = param("artifacts/infini_adapter/parallel.safetensors", "Trained layer-0 "
                     "weights (adapter / Infini layer, α) to write.", output="artifact")
    metrics: str = param("metrics/infini_adapter/parallel.json", "Metrics JSON to write.",
                         output="metrics")

    def check(self) -> None:
        if self.mode == "replace" and self.freeze_base_model:
            raise NewllmError("train_infini_adapter.freeze_base_model is for mode parallel; "
                              "replace fine-tunes the whole model, expected false.")


@stage_command("train-infini-adapter", BaseParams, TrainInfiniAdapterParams,
               help="Compressive memory on the pretrained base: a parallel adapter beside "
                    "layer 0 (α = 0 at start) or an Infini layer distilled from layer 0 that "
                    "then replaces it, fine-tuned with per-group learning rates.",
               runs="adapter_runs")
def train_infini_adapter(base_params: BaseParams, params: TrainInfiniAdapterParams) -> None:
    base = base_params.load()
    model, tokenizer = base.model, base.tokenizer
    separator_id = separator_token_id(tokenizer, base_params.separator_token)
    tokens_only = base.info.tokenizer_only()
    train_docs, _ = load_split(params.data, "train", base=tokens_only).documents()
    val_docs, _ = load_split(params.data, "val", base=tokens_only).documents(
        params.val_max_tokens)
    generator = seed_everything(params.seed)
    injection = inject_facts(tokenizer, params.reversal_facts, params.reversal_format,
                             params.reversal_inject_fraction, params.reversal_repeats,
                             key="train_infini_adapter.reversal_facts")
    reversal = injection.record
    stream = training_stream(train_docs, injection.facts, separator_id, params.max_train_tokens,
                             random.Random(params.seed), group="train_infini_adapter")
    sequences = make_sequences(stream, params.segment_length * params.segments_per_sequence)
    sequences = sequences.to(base.device)
    val_streams = [build_stream([d], separator_id)[0].to(base.device) for d in val_docs]
    s = params.segment_length
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and s > max_positions:
        raise NewllmError(f"train_infini_adapter.segment_length ({s}) exceeds the base's "
                          "max_position_embeddings.")
    config = memory_config(model, use_delta_rule=params.use_delta_rule,
                           use_alibi=params.use_alibi, memory_gradient=params.memory_gradient)
    metrics: dict[str, object] = {"mode": params.mode, "model_id": base.info.model_id,
                                  "segment_length": s, "train_tokens":
                                  int(sequences[:, :-1].numel()),
                                  "val_tokens": sum(len(d) for d in val_docs)}
    metrics["base_val_ppl"] = segmented_ppl(model, val_streams, s)
    model.requires_grad_(True)
    torch.manual_seed(params.seed)
    if params.mode == "parallel":
        first = val_streams[0][None]
        before = segmented_logits(model, first, s)
        wrapped = attach_parallel(model, config).to(base.device)
        metrics["step0_max_abs_logit_diff"] = float(
            (segmented_logits(model, first, s) - before).abs().max())
        if params.freeze_base_model:
            model.requires_grad_(False)
            wrapped.adapter.requires_grad_(True)
            wrapped.alpha.requires_grad_(True)
        groups = parameter_groups(model, params.finetune_lr, params.layer0_lr_scale,
                                  params.other_lr_scale)
        history = finetune(model, groups, sequences, s, params.finetune_epochs,
                           params.batch_size, generator, params.finetune_lr, base_params.device)
        metrics.update({"freeze_base_model": params.freeze_base_model,
                        "alpha": float(wrapped.alpha),
                        "final_train_loss": history[-1] if history else None,
                        "val_ppl": segmented_ppl(model, val_streams, s)})
        trained: torch.nn.Module = wrapped
    else:
        infini = InfiniLayer(config, params.d_ff).to(base.device)
        split = max(1, len(sequences) // 10)  # a tenth of the sequences held out
        held_out, train_seqs = sequences[:split], sequences[split:]
        if len(train_seqs) == 0:
            raise NewllmError("train_infini_adapter.max_train_tokens leaves no training "
                              "sequence after holding out a tenth for the distillation error.")
        metrics["distill_error_before"] = distill_error(infini, model, held_out, s)
        distill(infini, model, train_seqs, s, params.distill_epochs, params.distill_lr,
                params.batch_size, generator, base_params.device)
        metrics["distill_error_held_out"] = distill_error(infini, model, held_out, s)
        attach_replace(model, infini)
        metrics["after_distill_val_ppl"] = segmented_ppl(model, val_streams, s)
        groups = parameter_groups(model, params.finetune_lr, params.layer0_lr_scale,
                                  params.other_lr_scale)
        history = finetune(model, groups, train_seqs, s, params.finetune_epochs,
                           params.batch_size, generator, params.finetune_lr, base_params.device)
        metrics.update({"final_train_loss": history[-1] if history else None,
                        "val_ppl": segmented_ppl(model, val_streams, s)})
        trained = decoder_of(model).layers[0]
    # Every weight that moved: with full fine-tuning (or other_lr_scale > 0 in replace) the
    # whole base changed, so the artifact is the whole model; a frozen base keeps layer 0's
    # new weights only.
    whole = not (params.mode == "parallel" and params.freeze_base_model)
    save_artifact(params.out, trained_weights(model, trained, whole), kind=ADAPTER_KIND,
                  stage="train-infini-adapter", params=as_dict(base_params, params),
                  base=base.info.as_dict(),
                  extra={"mode": params.mode, "memory_config": config.__dict__,
                         "d_ff": params.d_ff, "segment_length": s, "whole_model": whole,
                         "separator_id": separator_id, "reversal": reversal,
                         "class": type(trained).__name__})
    write_metrics(params.metrics, {k: v for k, v in metrics.items() if v is not None})
    click.echo(f"train-infini-adapter {params.mode}: base PPL {metrics['base_val_ppl']:.2f} -> "
               f"{metrics['val_ppl']:.2f}"
               + (f", alpha {metrics['alpha']:.5f}" if "alpha" in metrics else "")
               + (f", distillation error {metrics['distill_error_held_out']:.3f}"
                  if "distill_error_held_out" in metrics else ""))

