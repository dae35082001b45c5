"""`newllm bench <name>`: each fast path against its naive reference, measured in one run.

Every benchmark prints both results (they must agree) and, as its last line,
`<name> speedup: <ratio>x`.
"""

from __future__ import annotations

import time

import click

from newllm.base import load_base
from newllm.data import load_split
from newllm.ppl import evaluate_ppl, separator_token_id


@click.group("bench")
def bench() -> None:
    """Benchmarks: fast path vs naive reference on the same inputs, printed as ratios."""


@bench.command("eval-ppl")
@click.option("--model", default="data/assets/smollm2-135m", show_default=True,
              help="Base model (as base.model).")
@click.option("--data", default="data/prepared", show_default=True, help="Prepared data folder.")
@click.option("--max-tokens", default=2048, show_default=True, help="Document tokens to score.")
@click.option("--context-length", default=32, show_default=True)
@click.option("--stride", default=16, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
def bench_eval_ppl(model: str, data: str, max_tokens: int, context_length: int, stride: int,
                   batch_size: int, device: str) -> None:
    """Batched sliding-window PPL vs the plain per-window loop (same PPL, speed ratio).

    Batching pays where a forward pass is small enough for per-call overhead and GEMM
    shape to matter (short windows on CPU, anything on a GPU); a 2-core CPU with long
    windows is already FLOP-bound, so expect a ratio near 1 there.
    """
    from newllm.ppl import HFScorer

    base = load_base(model, device=device)
    scorer = HFScorer(base.model, base.device, base.info, separator_token_id(base.tokenizer))
    docs, texts = load_split(data, "val", base=base.info.tokenizer_only()).documents(max_tokens)
    args = (scorer, docs, texts, scorer.separator_id, context_length, stride, batch_size)
    evaluate_ppl(scorer, docs[:1], texts[:1], *args[3:])  # warm-up: first-call allocations
    start = time.perf_counter()
    fast = evaluate_ppl(*args)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = evaluate_ppl(*args, naive=True)
    naive_s = time.perf_counter() - start
    click.echo(f"tokens {fast.tokens}, windows {fast.windows}, context {context_length}, "
               f"stride {stride}, batch {batch_size}, device {base.device}")
    click.echo(f"batched: token PPL {fast.token_ppl:.6f} in {fast_s:.2f}s")
    click.echo(f"naive:   token PPL {naive.token_ppl:.6f} in {naive_s:.2f}s")
    click.echo(f"PPL difference {abs(fast.token_ppl - naive.token_ppl):.2e}")
    click.echo(f"eval-ppl speedup: {naive_s / fast_s:.2f}x")
