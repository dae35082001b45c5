"""The evaluation line's benchmark: batched sliding-window PPL vs the per-window loop."""

from __future__ import annotations

import click
import torch

from newllm.core.base import BaseParams, load_base
from newllm.core.bench import (
    bench,
    gemm_peak_gflops,
    linear_shapes,
    stage_checked,
    stage_default,
    timed,
)
from newllm.core.data import load_split
from newllm.core.ppl import (
    HFScorer,
    Window,
    build_streams,
    evaluate_ppl,
    window_batches,
    window_spans,
)
from newllm.core.runtime import slow_bfloat16
from newllm.evaluation.stages.eval_ppl import EvalPplParams


def eval_flops(model: torch.nn.Module, batches: list[list[Window]]) -> float:
    """Model FLOPs of scoring `batches`: the decoder's matrix multiplies on every input
    position (padding included), the LM head on the kept positions, and causal attention."""
    _, body_weights, head_weights = linear_shapes(model)
    config = model.config
    flops = 0.0
    for batch in batches:
        rows, length = len(batch), batch[0].length
        keep = length - min(w.length - w.scored for w in batch)
        flops += 2 * rows * length * body_weights + 2 * rows * keep * head_weights
        # QK^T and AV: 2 * T^2 * d multiply-adds per layer and row, half of them causal
        flops += 2 * rows * length**2 * config.hidden_size * config.num_hidden_layers
    return flops



@bench.command("eval-ppl")
@click.option("--model", default=stage_default(BaseParams, "model"), show_default=True,
              help="Base model (as base.model).")
@click.option("--data", default=stage_default(EvalPplParams, "data"), show_default=True,
              help="Prepared data folder.")
@click.option("--max-tokens", default=2048, show_default=True,
              help="Document tokens for batched vs loop.")
@click.option("--context-length", default=32, show_default=True,
              help="Window of the batched vs loop comparison.")
@click.option("--stride", default=16, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--stage-tokens", default=6144, show_default=True,
              help="Document tokens for the roofline and bf16 runs, which use eval-ppl's own "
                   "settings (context, stride, batch size, documents).")
@click.option("--device", default="auto", show_default=True)
def bench_eval_ppl(model: str, data: str, max_tokens: int, context_length: int, stride: int,
                   batch_size: int, stage_tokens: int, device: str) -> None:
    """Batched sliding-window PPL vs the plain per-window loop, the achieved share of this
    machine's GEMM peak, and bfloat16 vs float32.

    Batching pays where a forward pass is small enough for per-call overhead and GEMM
    shape to matter (short windows on CPU, anything on a GPU), so the first comparison uses
    short windows. The roofline (achieved model GFLOP/s over the best float32 GEMM GFLOP/s
    measured here at the model's weight shapes) and the bf16 ratio use the eval-ppl stage's
    own defaults.
    """
    # the stage's own checks, before any model loads (a stride of 0 would never end)
    stage_checked(EvalPplParams, context_length=("--context-length", context_length),
                  stride=("--stride", stride), batch_size=("--batch-size", batch_size),
                  max_tokens=("--max-tokens", max_tokens))
    stage_checked(EvalPplParams, max_tokens=("--stage-tokens", stage_tokens))
    base = load_base(model, device=device)
    scorer = HFScorer.from_base(base)
    split = load_split(data, "val", base=base.info.tokenizer_only())
    sep = scorer.separator_id

    docs, texts = split.documents(max_tokens)
    args = (scorer, docs, texts, sep, context_length, stride, batch_size, "stream")
    evaluate_ppl(scorer, docs[:1], texts[:1], *args[3:])  # warm-up: first-call allocations
    fast, fast_s = timed(lambda: evaluate_ppl(*args))
    naive, naive_s = timed(lambda: evaluate_ppl(*args, naive=True))

    stage = {k: stage_default(EvalPplParams, k)
             for k in ("context_length", "stride", "batch_size", "documents")}
    docs, texts = split.documents(stage_tokens)
    streams = build_streams(docs, sep, stage["documents"])
    windows = [Window(i, b, e, n) for i, (ids, _) in enumerate(streams)
               for b, e, n in window_spans(len(ids), stage["context_length"], stage["stride"])]
    flops = eval_flops(base.model, window_batches(windows, stage["batch_size"],
                                                  stage["context_length"], stage["stride"]))
    settings = (sep, stage["context_length"], stage["stride"], stage["batch_size"],
                stage["documents"])
    evaluate_ppl(scorer, docs[:2], texts[:2], *settings)  # warm-up
    fp32, fp32_s = timed(lambda: evaluate_ppl(scorer, docs, texts, *settings))
    # bf16 vs fp32 on the same documents; a CPU without native bf16 runs it about 100x slower,
    # so there both are timed on a few hundred tokens only.
    native = not slow_bfloat16(base.device)
    bf16_docs, bf16_texts = (docs, texts) if native else split.documents(256)
    bf16_scorer = HFScorer.from_base(load_base(model, dtype="bfloat16", device=device))
    evaluate_ppl(bf16_scorer, bf16_docs[:1], bf16_texts[:1], *settings)  # warm-up
    bf16, bf16_s = timed(lambda: evaluate_ppl(bf16_scorer, bf16_docs, bf16_texts, *settings))
    same_fp32, same_fp32_s = (fp32, fp32_s) if native else timed(
        lambda: evaluate_ppl(scorer, bf16_docs, bf16_texts, *settings))
    shapes, _, _ = linear_shapes(base.model)
    rows = stage["batch_size"] * stage["context_length"]
    peak = {"float32": gemm_peak_gflops(shapes, rows, torch.float32),
            "bfloat16": gemm_peak_gflops(shapes, rows if native else 32, torch.bfloat16)}
    achieved = flops / fp32_s / 1e9

    click.echo(f"batched vs loop: tokens {fast.tokens}, windows {fast.windows}, context "
               f"{context_length}, stride {stride}, batch {batch_size}, device {base.device}")
    click.echo(f"batched: token PPL {fast.token_ppl:.6f} in {fast_s:.2f}s")
    click.echo(f"naive:   token PPL {naive.token_ppl:.6f} in {naive_s:.2f}s")
    click.echo(f"PPL difference {abs(fast.token_ppl - naive.token_ppl):.2e}")
    click.echo(f"eval-ppl settings: tokens {fp32.tokens}, windows {fp32.windows}, context "
               f"{stage['context_length']}, stride {stage['stride']}, batch "
               f"{stage['batch_size']}, documents {stage['documents']}, "
               f"{torch.get_num_threads()} threads, CPU capability "
               f"{torch.backends.cpu.get_cpu_capability()}, native bfloat16 "
               f"{'no' if slow_bfloat16(base.device) else 'yes'}")
    click.echo(f"float32:  token PPL {fp32.token_ppl:.6f} in {fp32_s:.2f}s, {achieved:.0f} "
               f"GFLOP/s; GEMM peak at the model's shapes ({rows} rows) {peak['float32']:.0f} "
               "GFLOP/s")
    click.echo(f"bfloat16 ({bf16.tokens} tokens): token PPL {bf16.token_ppl:.6f} in "
               f"{bf16_s:.2f}s vs float32 {same_fp32.token_ppl:.6f} in {same_fp32_s:.2f}s; "
               f"bf16 GEMM peak {peak['bfloat16']:.0f} GFLOP/s")
    click.echo(f"eval-ppl roofline: {achieved / peak['float32']:.2f}")
    click.echo(f"eval-ppl bf16: {same_fp32_s / bf16_s:.2f}x, ppl delta "
               f"{100 * (bf16.token_ppl / same_fp32.token_ppl - 1):+.3f}%")
    click.echo(f"eval-ppl speedup: {naive_s / fast_s:.2f}x")
