"""train-lm: train a factory kind (pythia, infini, multi_memory, hierarchical) on the prepared
corpus, segment by segment with the memory carried; val PPL per epoch through eval-ppl's code.

Writes `<out>` (the model, artifact kind `infini-lm`, with its config, vocabulary and the
reversal pairs it was shown), metrics (final val PPL, the seed's diagnostic flag: below 5 a
leak or causal-mask bug, above 1000 not learning) and per-epoch plot data.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import click
import torch

from newllm.core.artifacts import write_csv, write_metrics
from newllm.core.base import BaseParams, load_tokenizer
from newllm.core.cli import stage_command
from newllm.core.data import load_split
from newllm.core.errors import NewllmError
from newllm.core.params import as_dict, param
from newllm.core.ppl import DOCUMENT_MODES, evaluate_ppl
from newllm.core.reversal import (
    DEFAULT_TEMPLATES,
    FORMATS,
    SHIPPED,
    inject_facts,
    parse_templates,
    sentences,
)
from newllm.core.runtime import resolve_device, seed_everything, single_thread
from newllm.core.tokens import separator_token_id
from newllm.core.train import COMPUTE_DTYPES, TrainConfig, Trainer
from newllm.infini import LM_KINDS
from newllm.infini.models import count_parameters, create_model
from newllm.infini.training import (
    SegmentScorer,
    build_vocabulary,
    make_sequences,
    ppl_flag,
    save_lm,
    sequence_loss,
    training_stream,
)


@dataclass
class TrainLmParams:
    group = "train_lm"
    kind: str = param("infini", "Model kind of the factory.", choices=LM_KINDS)
    data: str = param("data/prepared", "Prepared data folder (from prepare-data).")
    d_model: int = param(64, "Model width.", min=8)
    n_layers: int = param(4, "Decoder layers (layer 0 is the memory layer of memory kinds).",
                          min=1)
    n_heads: int = param(4, "Attention / memory heads.", min=1)
    d_ff: int = param(256, "MLP hidden width.", min=1)
    shortlist: int = param(4096, "Softmax classes: the most frequent training tokens (plus "
                           "every token of the reversal pairs), the rest share one 'other' "
                           "class with unigram probabilities inside it; 0 = whole vocabulary.",
                           min=0)
    use_delta_rule: bool = param(True, "Delta-rule memory update (else linear).")
    num_memory_banks: int = param(1, "infini: memory banks.", min=1)
    segments_per_bank: int = param(4, "infini: segments written to a bank before the next.",
                                   min=1)
    use_alibi: bool = param(False, "Decay older segments in memory (ALiBi over segments).")
    alibi_scale: float = param(1.0, "ALiBi slope scale (larger: faster decay).", min=0.0)
    num_memories: int = param(4, "multi_memory / hierarchical: number of memories.", min=1)
    segment_length: int = param(32, "Tokens per segment.", min=2)
    segments_per_sequence: int = param(8, "Segments per training sequence (memory reset "
                                       "at each sequence's start).", min=1)
    epochs: int = param(1, "Passes over the training sequences.", min=1)
    lr: float = param(3e-3, "AdamW learning rate (cosine-decayed to 0).", min=1e-12)
    batch_size: int = param(2, "Sequences per optimizer step.", min=1)
    max_train_tokens: int | None = param(98304, "Training tokens (the stream is cut here; "
                                         "injected facts count); null = the whole split.",
                                         min=2)
    compute_dtype: str = param("float32", "Training precision (bfloat16: autocast).",
                               choices=COMPUTE_DTYPES)
    val_max_tokens: int | None = param(16384, "Val tokens for the per-epoch PPL (whole "
                                       "documents); null = the whole split.", min=1)
    val_documents: str = param("separate", "How the per-epoch val PPL reads documents (as "
                               "eval_ppl.documents).", choices=DOCUMENT_MODES)
    reversal_facts: str | None = param(SHIPPED, "Pairs file whose forward sentences are "
                                       "mixed into the training stream ('shipped' = the "
                                       "package's own; null = none).")
    reversal_format: str = param("csv", "Format of reversal_facts.", choices=FORMATS)
    reversal_templates: list[str] = param(  # noqa: RUF009 (param copies the list)
        DEFAULT_TEMPLATES, "[forward, backward] templates (as eval_reversal.templates).")
    reversal_inject_fraction: float = param(0.5, "Share of the pairs whose forward sentence "
                                            "is injected (evenly spread); the rest are the "
                                            "never-injected control.", min=0.0, max=1.0)
    reversal_repeats: int = param(20, "Times each injected sentence appears in the stream.",
                                  min=1)
    seed: int = param(0, "Seed of the initialization, the fact placement and batch order.",
                      min=0)
    out: str = param("artifacts/infini/lm/model.safetensors", "Model artifact to write.",
                     output="artifact")
    metrics: str = param("metrics/infini/train_lm.json", "Metrics JSON to write.",
                         output="metrics")
    plot: str = param("plots/infini/train_lm.csv", "Per-epoch train loss and val PPL (CSV).",
                      output="plot")

    def check(self) -> None:
        parse_templates(self.reversal_templates, "train_lm.reversal_templates")


@stage_command("train-lm", BaseParams, TrainLmParams,
               help="Train a pythia / infini / multi_memory / hierarchical LM on the prepared "
                    "corpus in segments (memory carried across the segments of a sequence); "
                    "per-epoch val PPL by eval-ppl's code, flagged below 5 or above 1000.",
               runs="infini_runs")
def train_lm(base_params: BaseParams, params: TrainLmParams) -> None:
    tokenizer, info = load_tokenizer(base_params.model)
    separator_id = separator_token_id(tokenizer, base_params.separator_token)
    train = load_split(params.data, "train", base=info.tokenizer_only())
    val = load_split(params.data, "val", base=info.tokenizer_only())
    rng = random.Random(params.seed)

    templates = parse_templates(params.reversal_templates, "train_lm.reversal_templates")
    injection = inject_facts(tokenizer, params.reversal_facts, params.reversal_format,
                             params.reversal_inject_fraction, params.reversal_repeats, templates,
                             key="train_lm.reversal_facts")
    facts = injection.facts
    pair_ids: list[int] = []
    for pair in injection.pairs:  # every name the evaluation asks about gets its own class
        for sentence in sentences(pair, templates):
            pair_ids += tokenizer(sentence, add_special_tokens=False)["input_ids"]
    docs, _ = train.documents()
    stream = training_stream(docs, facts, separator_id, params.max_train_tokens, rng)
    seq_tokens = params.segment_length * params.segments_per_sequence
    sequences = make_sequences(stream, seq_tokens)

    generator = seed_everything(params.seed)
    vocab_size = len(tokenizer)
    options = {k: getattr(params, k) for k in (
        "d_model", "n_layers", "n_heads", "d_ff", "shortlist", "use_delta_rule",
        "num_memory_banks", "segments_per_bank", "use_alibi", "alibi_scale", "num_memories")}
    model = create_model(params.kind, vocab_size=vocab_size, max_length=params.segment_length,
                         **options)
    if params.shortlist:
        if params.shortlist >= vocab_size:
            raise NewllmError(f"train_lm.shortlist ({params.shortlist}) must be below the "
                              f"vocabulary size ({vocab_size}), or 0 for the whole vocabulary.")
        # unigram statistics of the whole train split, even past max_train_tokens: they are
        # training data, and a shortlist cut from a few thousand tokens misses most of val's
        short_ids, counts = build_vocabulary(train.input_ids, [separator_id, *pair_ids],
                                             vocab_size, params.shortlist)
        model.set_vocabulary(short_ids, counts)

    device = resolve_device(base_params.device)
    val_docs, val_texts = val.documents(params.val_max_tokens)
    separator_token = tokenizer.convert_ids_to_tokens(separator_id)

    def val_nll(m: torch.nn.Module) -> float:
        scorer = SegmentScorer(m, params.segment_length, device, info, separator_id,
                               separator_token)
        result = evaluate_ppl(scorer, val_docs, val_texts, separator_id, params.segment_length,
                              params.segment_length, 1, params.val_documents)
        return result.nll / result.tokens

    trainer = Trainer(TrainConfig("train_lm", params.epochs, params.batch_size, params.lr,
                                  params.compute_dtype, optimizer="adamw",
                                  device=base_params.device))
    with single_thread():
        history = trainer.fit(model, lambda m, rows: sequence_loss(
            m, sequences[rows].to(trainer.device), params.segment_length), len(sequences),
            generator, evaluate=val_nll, desc=f"train-lm {params.kind}")
    model = model.cpu().eval()
    final_ppl = math.exp(history[-1].val_loss)
    extra = {"separator_id": separator_id, "train_tokens": int(sequences[:, :-1].numel()),
             "reversal": injection.record,
             "val_ppl": final_ppl}
    save_lm(params.out, model, segment_length=params.segment_length,
            params=as_dict(base_params, params), base=info.tokenizer_only(), extra=extra)
    write_csv(params.plot, ["epoch", "train_loss", "val_loss", "val_ppl"],
              [[e.epoch, f"{e.train_loss:.8g}", f"{e.val_loss:.8g}",
                f"{math.exp(e.val_loss):.8g}"] for e in history])
    flag = ppl_flag(final_ppl)
    write_metrics(params.metrics, {
        "kind": params.kind, "parameters": count_parameters(model),
        "train_tokens": extra["train_tokens"], "train_sequences": len(sequences),
        "injected_fact_tokens": sum(len(f) + 1 for f in facts),
        "epochs": params.epochs, "final_train_loss": history[-1].train_loss,
        "val_ppl": final_ppl, "val_tokens": sum(len(d) for d in val_docs),
        "val_ppl_flag": flag, "use_delta_rule": params.use_delta_rule,
        "use_alibi": params.use_alibi,
        **{f"val_ppl_epoch{e.epoch}": math.exp(e.val_loss) for e in history},
    })
    warning = {"suspicious_low": " (below 5: check for a leak or a causal-mask bug)",
               "not_learning": " (above 1000: not learning; more tokens/epochs or another lr)",
               "ok": ""}[flag]
    click.echo(f"train-lm {params.kind}: {count_parameters(model):,} parameters, "
               f"{extra['train_tokens']:,} tokens x {params.epochs} epoch(s); val PPL "
               f"{final_ppl:.2f}{warning}")

