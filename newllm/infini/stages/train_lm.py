"""train-lm: train a factory kind (pythia, infini, multi_memory, hierarchical) on the prepared
corpus, segment by segment with the memory carried; val PPL per epoch through eval-ppl's code.

Writes `<out>` (the model, artifact kind `infini-lm`, with its config, vocabulary and the
reversal pairs it was shown), metrics (final val PPL, the seed's diagnostic flag: below 5 a
leak or causal-mask bug, above 1000 not learning) and per-epoch plot data.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

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
from newllm.infini.memory import MEMORY_GRADIENTS
from newllm.infini.models import count_parameters, create_model
from newllm.infini.passkey import (
    DIGITS,
    PasskeyTokens,
    passkey_probe,
    passkey_task,
    training_sequences,
)
from newllm.infini.training import (
    SegmentScorer,
    WindowScorer,
    build_vocabulary,
    make_sequences,
    memory_grad_norms,
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
    memory_gradient: str = param("sequence", "What gradients cross segments: sequence = "
                                 "through the memory across the segments of a training "
                                 "sequence (truncated BPTT), none = the seed's detached write.",
                                 choices=MEMORY_GRADIENTS)
    segment_length: int = param(32, "Tokens per segment.", min=2)
    segments_per_sequence: int = param(8, "Segments per training sequence (memory reset "
                                       "at each sequence's start).", min=1)
    passkey_share: float = param(0.5, "Share of the training sequences (and tokens) that "
                                 "are passkey sequences (key in segment 0, asked after 0 .. "
                                 "segments-2 filler segments; newllm.infini.passkey).",
                                 min=0.0, max=0.9)
    passkey_segment_length: int = param(32, "Tokens per passkey task segment (the task is "
                                        "recorded in the model; a training sequence holds "
                                        "a whole number of them).", min=8)
    passkey_monitor_trials: int = param(100, "Passkey trials per distance of the per-epoch "
                                        "learning curve (distances 1 and the largest).",
                                        min=1)
    window_stride: int = param(8, "Stride of the sliding-window val PPL of a kind without "
                               "memory (context = segment_length, what it can attend).",
                               min=1)
    epochs: int = param(3, "Passes over the training sequences.", min=1)
    lr: float = param(1e-2, "AdamW learning rate (cosine-decayed to 0).", min=1e-12)
    batch_size: int = param(8, "Sequences per optimizer step.", min=1)
    max_train_tokens: int | None = param(131072, "Training tokens (the stream is cut here; "
                                         "injected facts and passkey sequences count); "
                                         "null = the whole split (plus passkey sequences).",
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
    seq_tokens = params.segment_length * params.segments_per_sequence
    task = passkey_task(seq_tokens, params.passkey_segment_length)
    passkey_tokens = PasskeyTokens.build(tokenizer, separator_id, task.segment_length)
    # passkey sequences take `passkey_share` of the training sequences and of max_train_tokens
    # (the same steps at any share; the text stream, facts included, fills the rest)
    if params.max_train_tokens is None:
        text_tokens = None
        stream = training_stream(docs, facts, separator_id, None, rng)
        n_text = (len(stream) - 1) // seq_tokens
        n_passkey = round(params.passkey_share / (1 - params.passkey_share) * n_text)
    else:
        whole = (params.max_train_tokens - 1) // seq_tokens  # sequences the budget holds
        n_passkey = round(params.passkey_share * whole)
        text_tokens = params.max_train_tokens - n_passkey * seq_tokens
        stream = training_stream(docs, facts, separator_id, text_tokens, rng)
    passkey_rows, passkey_answers = training_sequences(task, passkey_tokens, n_passkey,
                                                       seq_tokens + 1, rng)
    text_rows = make_sequences(stream, seq_tokens)
    sequences = torch.cat([text_rows, passkey_rows])
    answers = torch.cat([torch.full((len(text_rows),), -1), passkey_answers])  # -1: text

    generator = seed_everything(params.seed)
    vocab_size = len(tokenizer)
    options = {k: getattr(params, k) for k in (
        "d_model", "n_layers", "n_heads", "d_ff", "shortlist", "use_delta_rule",
        "num_memory_banks", "segments_per_bank", "use_alibi", "alibi_scale", "num_memories",
        "memory_gradient")}
    model = create_model(params.kind, vocab_size=vocab_size, max_length=params.segment_length,
                         **options)
    if params.shortlist:
        if params.shortlist >= vocab_size:
            raise NewllmError(f"train_lm.shortlist ({params.shortlist}) must be below the "
                              f"vocabulary size ({vocab_size}), or 0 for the whole vocabulary.")
        # unigram statistics of the whole train split, even past max_train_tokens: they are
        # training data, and a shortlist cut from a few thousand tokens misses most of val's;
        # the passkey task's tokens get classes of their own
        short_ids, counts = build_vocabulary(
            train.input_ids, [separator_id, *pair_ids, *passkey_tokens.vocabulary()],
            vocab_size, params.shortlist)
        model.set_vocabulary(short_ids, counts)

    device = resolve_device(base_params.device)
    val_docs, val_texts = val.documents(params.val_max_tokens)
    separator_token = tokenizer.convert_ids_to_tokens(separator_id)

    monitor = [1, task.max_distance] if task.max_distance > 1 else [task.max_distance]
    curve: list[dict[str, float]] = []  # passkey accuracy after each epoch

    def val_nll(m: torch.nn.Module) -> float:
        scorer = SegmentScorer(m, params.segment_length, device, info, separator_id,
                               separator_token)
        result = evaluate_ppl(scorer, val_docs, val_texts, separator_id, params.segment_length,
                              params.segment_length, 1, params.val_documents)
        probe = passkey_probe(m, params.segment_length, task, passkey_tokens, monitor,
                              params.passkey_monitor_trials, DIGITS, seed=params.seed + 1)
        curve.append({f"passkey_d{r.distance}": r.accuracy for r in probe})
        return result.nll / result.tokens

    grad_probe, probe_answers = training_sequences(task, passkey_tokens, 16, seq_tokens + 1,
                                                   random.Random(params.seed + 2))
    with single_thread():
        gradients = {"init": memory_grad_norms(model, grad_probe, probe_answers,
                                               params.segment_length)}
    trainer = Trainer(TrainConfig("train_lm", params.epochs, params.batch_size, params.lr,
                                  params.compute_dtype, optimizer="adamw",
                                  device=base_params.device))
    with single_thread():
        history = trainer.fit(model, lambda m, rows: sequence_loss(
            m, sequences[rows].to(trainer.device), params.segment_length,
            answers[rows].to(trainer.device)), len(sequences),
            generator, evaluate=val_nll, desc=f"train-lm {params.kind}")
        model = model.cpu().eval()
        gradients["final"] = memory_grad_norms(model, grad_probe, probe_answers,
                                               params.segment_length)
        window_ppl = None
        if model.memory is None:  # what a model without memory can attend: a sliding window
            window = WindowScorer(model, torch.device("cpu"), info, separator_id,
                                  separator_token, params.segment_length)
            window_ppl = evaluate_ppl(window, val_docs, val_texts, separator_id,
                                      params.segment_length, min(params.window_stride,
                                                                 params.segment_length),
                                      16, params.val_documents).token_ppl
    final_ppl = math.exp(history[-1].val_loss)
    extra = {"separator_id": separator_id, "train_tokens": int(sequences[:, :-1].numel()),
             "reversal": injection.record, "val_ppl": final_ppl,
             "passkey_task": asdict(task)}
    save_lm(params.out, model, segment_length=params.segment_length,
            params=as_dict(base_params, params), base=info.tokenizer_only(), extra=extra)
    curve_keys = list(curve[0])
    write_csv(params.plot, ["epoch", "train_loss", "val_loss", "val_ppl", *curve_keys],
              [[e.epoch, f"{e.train_loss:.8g}", f"{e.val_loss:.8g}",
                f"{math.exp(e.val_loss):.8g}", *(f"{c[k]:.4g}" for k in curve_keys)]
               for e, c in zip(history, curve, strict=True)])
    flag = ppl_flag(final_ppl)
    write_metrics(params.metrics, {
        "kind": params.kind, "parameters": count_parameters(model),
        "train_tokens": extra["train_tokens"], "train_sequences": len(sequences),
        "injected_fact_tokens": sum(len(f) + 1 for f in facts),
        "passkey_sequences": n_passkey, "seed": params.seed,
        "memory_gradient": params.memory_gradient if model.memory is not None else None,
        "epochs": params.epochs, "final_train_loss": history[-1].train_loss,
        "val_ppl": final_ppl, "val_tokens": sum(len(d) for d in val_docs),
        "val_ppl_window": window_ppl,
        "window_context_length": None if window_ppl is None else params.segment_length,
        "window_stride": (None if window_ppl is None
                          else min(params.window_stride, params.segment_length)),
        "val_ppl_flag": flag, "use_delta_rule": params.use_delta_rule,
        "use_alibi": params.use_alibi,
        # the flattening check: the last epoch's relative val PPL change
        "val_ppl_last_change": (math.exp(history[-1].val_loss - history[-2].val_loss) - 1
                                if len(history) > 1 else None),
        **{f"val_ppl_epoch{e.epoch}": math.exp(e.val_loss) for e in history},
        **{f"{k}_epoch{e.epoch}": c[k] for e, c in zip(history, curve, strict=True)
           for k in c},
        **{f"memory_grad_{name}_{when}": norm for when, norms in gradients.items()
           for name, norm in norms.items()},
    })
    warning = {"suspicious_low": " (below 5: check for a leak or a causal-mask bug)",
               "not_learning": " (above 1000: not learning; more tokens/epochs or another lr)",
               "ok": ""}[flag]
    click.echo(f"train-lm {params.kind}: {count_parameters(model):,} parameters, "
               f"{extra['train_tokens']:,} tokens x {params.epochs} epoch(s); val PPL "
               f"{final_ppl:.2f}{warning}")

