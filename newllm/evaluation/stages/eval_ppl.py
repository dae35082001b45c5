"""eval-ppl: sliding-window token PPL, word PPL and bits per byte on a prepared split."""

from __future__ import annotations

from dataclasses import dataclass

import click

from newllm.core.artifacts import write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.data import SPLITS, load_split
from newllm.core.params import param
from newllm.core.ppl import (
    DOCUMENT_MODES,
    SCORER_KINDS,
    check_window,
    evaluate_ppl,
    load_scorer,
)


@dataclass
class EvalPplParams:
    group = "eval_ppl"
    model_kind: str = param("hf", "Model kind to evaluate: hf = the base causal LM; the "
                            "others are trained models read from `checkpoint`.",
                            choices=tuple(SCORER_KINDS))
    checkpoint: str | None = param(None, "Trained model artifact of a model kind other than "
                                   "hf (null for hf).")
    data: str = param("data/prepared", "Prepared data folder (from prepare-data).")
    split: str = param("val", "Split to evaluate.", choices=SPLITS)
    context_length: int = param(512, "Tokens per window.", min=2)
    stride: int = param(256, "New tokens scored per window after the first.", min=1)
    batch_size: int = param(4, "Forward-pass size in windows: at most batch_size x "
                            "context_length input tokens and batch_size x stride scored "
                            "positions (short documents share a batch).", min=1)
    documents: str = param("separate", "separate: each document scored on its own as [sep, "
                           "doc] (lm-evaluation-harness's loglikelihood_rolling); stream: "
                           "documents back to back, [sep, d1, sep, d2, ...].",
                           choices=DOCUMENT_MODES)
    max_tokens: int | None = param(None, "Evaluate whole documents until this many tokens "
                                   "(null = the whole split).", min=1)
    metrics: str = param("metrics/eval_ppl.json", "Metrics JSON to write.", output="metrics")

    def check(self) -> None:
        check_window(self.context_length, self.stride, None)  # before loading any model


@stage_command("eval-ppl", BaseParams, EvalPplParams,
               help="Sliding-window perplexity: every token scored once, windows after the "
                    "first score only their last `stride` tokens; documents scored separately "
                    "(as lm-evaluation-harness) or as one stream. Reports token PPL, word PPL "
                    "and bits per byte.")
def eval_ppl(base: BaseParams, params: EvalPplParams) -> None:
    scorer = load_scorer(params.model_kind, base, params.checkpoint)
    split = load_split(params.data, params.split, base=scorer.info.tokenizer_only())
    docs, texts = split.documents(params.max_tokens)
    result = evaluate_ppl(scorer, docs, texts, scorer.separator_id, params.context_length,
                          params.stride, params.batch_size, params.documents)
    metrics = {
        "token_ppl": result.token_ppl, "word_ppl": result.word_ppl,
        "bits_per_byte": result.bits_per_byte, "tokens": result.tokens, "words": result.words,
        "bytes": result.bytes, "documents": len(docs), "windows": result.windows,
        "documents_mode": params.documents, "separator_token": scorer.separator_token,
        "separator_token_id": scorer.separator_id,
        "context_length": result.context_length, "stride": result.stride,
        "split": params.split, "model_kind": params.model_kind, "model_id": scorer.info.model_id,
        "checkpoint": params.checkpoint,
    }
    write_metrics(params.metrics, metrics)
    click.echo(f"{params.split}: token PPL {result.token_ppl:.4f}, word PPL "
               f"{result.word_ppl:.4f}, bits/byte {result.bits_per_byte:.4f} "
               f"({result.tokens} tokens, {len(docs)} documents "
               f"{'scored separately' if params.documents == 'separate' else 'as one stream'} "
               f"after {scorer.separator_token}, "
               + ("read whole by the recurrence)" if result.context_length is None else
                  f"context {params.context_length}, stride {params.stride})"))
