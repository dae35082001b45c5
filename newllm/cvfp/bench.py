"""The CVFP line's benchmark: prep-cache's fast paths vs the seeds' per-token loop."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click
import torch

from newllm.core.base import BaseParams, load_base
from newllm.core.bench import bench, stage_checked, stage_default, timed
from newllm.core.errors import NewllmError
from newllm.cvfp.stages.phase2_prep_cache import PrepCacheParams

_RSS_PROBE = """
import resource, sys
from newllm.core.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    if done.code:
        raise
print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@bench.command("prep-cache")
@click.option("--model", default=stage_default(BaseParams, "model"), show_default=True,
              help="Base model whose input embeddings the blocks read.")
@click.option("--blocks", default=stage_default(PrepCacheParams, "blocks"), show_default=True,
              help="Phase-1 blocks; if the file is missing, freshly initialised blocks of "
                   "the phase1_context defaults are used (same speed, same exactness).")
@click.option("--data", default=stage_default(PrepCacheParams, "data"), show_default=True)
@click.option("--tokens", default=20000, show_default=True,
              help="Train-stream tokens for the fast paths.")
@click.option("--naive-tokens", default=2000, show_default=True,
              help="Tokens for the per-token loop (the first of the same stream).")
@click.option("--rss-tokens", default=20000, show_default=True,
              help="Stream length of the 1x peak-RSS run (the other is 4x).")
def bench_prep_cache(model: str, blocks: str, data: str, tokens: int, naive_tokens: int,
                     rss_tokens: int) -> None:
    """prep-cache's fast paths vs the seeds' per-token loop: identical contexts, tokens/s,
    speed ratio; and peak RSS of the stage at 1x and 4x the stream length."""
    import tempfile

    # phase2-prep-cache's own checks, before any model loads
    for option, value in (("--tokens", tokens), ("--naive-tokens", naive_tokens),
                          ("--rss-tokens", rss_tokens)):
        stage_checked(PrepCacheParams, train_tokens=(option, value))
    if naive_tokens > tokens:
        raise NewllmError(f"option --naive-tokens ({naive_tokens}) must be <= --tokens "
                          f"({tokens}): the loop is compared on the first tokens of the same "
                          "stream.")
    base = load_base(model, device="cpu")
    embeddings = base.input_embeddings()
    scratch = Path(tempfile.mkdtemp(prefix="newllm-bench-"))
    try:
        _run(base, embeddings, scratch, model, blocks, data, tokens, naive_tokens, rss_tokens)
    finally:  # the scratch folder goes on any end: an error, ctrl-C
        shutil.rmtree(scratch, ignore_errors=True)


def _run(base: Any, embeddings: torch.Tensor, scratch: Path, model: str, blocks: str,
         data: str, tokens: int, naive_tokens: int, rss_tokens: int) -> None:
    import copy
    import subprocess
    import sys

    from newllm.core.tokens import separator_token_id
    from newllm.cvfp.checkpoint import load_blocks, save_blocks, token_stream
    from newllm.cvfp.model import CVFPLM, CVFPConfig
    from newllm.cvfp.recurrence import naive_contexts, stream_contexts
    from newllm.cvfp.stages.phase1_context import Phase1Params

    if Path(blocks).is_file():
        cvfp, _ = load_blocks(blocks, base.info.as_dict(), embeddings)
    else:
        p1 = Phase1Params()
        torch.manual_seed(0)
        cvfp = CVFPLM(CVFPConfig(embeddings.shape[0], embeddings.shape[1], p1.num_blocks,
                                 p1.context_layers, p1.token_layers, p1.context_dim,
                                 p1.context_norm), embeddings)
        blocks = str(scratch / "blocks.safetensors")
        save_blocks(Path(blocks), cvfp, params={}, base=base.info.as_dict(), extra={})
        click.echo(f"no blocks artifact: freshly initialised phase1_context defaults in {blocks}")
    separator = separator_token_id(base.tokenizer)
    ids = token_stream(data, "train", separator, base.info.tokenizer_only(), 4 * max(
        tokens, rss_tokens))
    stream = ids[:tokens]
    c = cvfp.config
    click.echo(f"blocks {c.num_blocks} x {c.context_layers} layer(s) x {c.context_dim}, "
               f"context_norm {c.context_norm}, threads {torch.get_num_threads()}")
    stream_contexts(cvfp, stream[:256], chunk_tokens=8192)  # warm-up (TorchScript)
    results = {}
    for method in ("sequential", "picard"):
        n = tokens if method == "sequential" else min(tokens, naive_tokens)
        (out, seconds) = timed(lambda m=method, n=n: stream_contexts(cvfp, stream[:n],
                                                                     chunk_tokens=8192,
                                                                     method=m))
        results[method] = (out, n / seconds)
    reference, seconds = timed(lambda: naive_contexts(cvfp, stream[:naive_tokens]))
    naive_rate = naive_tokens / seconds
    # float32 paths that round in different orders drift apart along a stream whose map is
    # not a contraction; the float64 loop says how far each is from the exact contexts
    exact = naive_contexts(copy.deepcopy(cvfp).double(), stream[:naive_tokens]).float()
    click.echo(f"per-token loop (seeds): {naive_rate:,.0f} tokens/s on {naive_tokens} tokens, "
               f"max |difference| to the float64 loop {(reference - exact).abs().max():.2e}")
    for method, (out, rate) in results.items():
        diff = (out[:naive_tokens] - reference).abs().max().item()
        click.echo(f"{method}: {rate:,.0f} tokens/s, {rate / naive_rate:.1f}x the loop, "
                   f"max |difference| {diff:.2e} to the loop and "
                   f"{(out[:naive_tokens] - exact).abs().max():.2e} to the float64 loop, on "
                   f"the first {naive_tokens} tokens")
    peaks = []
    for length in (rss_tokens, 4 * rss_tokens):
        run = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, "phase2-prep-cache", "--model", model,
             "--blocks", blocks, "--data", data, "--train-tokens", str(length),
             "--val-tokens", "2", "--out", str(scratch / f"cache{length}"),
             "--metrics", str(scratch / f"m{length}.json")],
            capture_output=True, text=True, check=True)
        peaks.append(int(run.stdout.split("peak_rss_kb")[-1]) / 1024)
        click.echo(f"prep-cache peak RSS at {length} tokens: {peaks[-1]:,.0f} MiB")
    click.echo(f"peak RSS growth at 4x the stream: {100 * (peaks[1] / peaks[0] - 1):.1f}%")
    click.echo(f"prep-cache speedup: {results['sequential'][1] / naive_rate:.1f}x")


@bench.command("cvfp-head")
@click.option("--model", default=stage_default(BaseParams, "model"), show_default=True,
              help="Base model whose input embeddings the blocks read.")
@click.option("--configs", default="blocks2_500,c1t1_500,c2t2_500,no_context_norm",
              show_default=True, help="Grid configurations to rank, comma-separated.")
@click.option("--seed", default=0, show_default=True, help="One seed per configuration.")
@click.option("--shortlist", default=2048, show_default=True,
              help="Training softmax classes to compare with the full head.")
def bench_cvfp_head(model: str, configs: str, seed: int, shortlist: int) -> None:
    """Does the shortlist training softmax rank grid configurations as the full head does?
    Each configuration at cvfp_grid's budget (params.yaml), phase 2 twice on the same
    blocks: with --shortlist classes and with the full 49k-token head; val PPL (full head)
    of both, their order, and the time each head took."""
    import time

    from newllm.core.base import load_tokenizer
    from newllm.core.params import build_params, read_params_file
    from newllm.core.runtime import resolve_device
    from newllm.core.tokens import separator_token_id
    from newllm.cvfp.checkpoint import read_input_embeddings, token_stream
    from newllm.cvfp.grid import GRID, Budget, run_seed
    from newllm.cvfp.stages.cvfp_grid import CvfpGridParams

    names = [c for c in configs.split(",") if c]
    unknown = [c for c in names if c not in GRID]
    if unknown or len(names) < 2:
        raise NewllmError(f"option --configs: expected at least two of {', '.join(GRID)}, got "
                          f"{configs!r}.")
    p = build_params(CvfpGridParams, read_params_file(Path("params.yaml")).get("cvfp_grid"), {})
    if shortlist <= 0:
        raise NewllmError(f"option --shortlist: expected a positive number, got {shortlist}.")
    tokenizer, info = load_tokenizer(model)
    embeddings = read_input_embeddings(model)
    if embeddings is None:
        embeddings = load_base(model, device="cpu").input_embeddings()
    separator = separator_token_id(tokenizer)
    budget = Budget(p.phase1_tokens, p.phase1_batch_size, p.max_iterations, p.train_tokens,
                    p.val_tokens, p.epochs, p.batch_size, p.lr, 0)
    data = info.tokenizer_only()
    train_ids = token_stream(p.data, "train", separator, data,
                             max(p.phase1_tokens, p.train_tokens))
    val_ids = token_stream(p.data, "val", separator, data, p.val_tokens)
    rows = {}
    for name in names:
        began = time.perf_counter()
        figures, _ = run_seed(name, embeddings, train_ids, val_ids, separator, budget, seed,
                              resolve_device("cpu"), also_shortlists=(shortlist,))
        rows[name] = (figures["val_ppl_shortlist0"], figures[f"val_ppl_shortlist{shortlist}"])
        click.echo(f"{name}: val PPL full head {rows[name][0]:.1f} "
                   f"({figures['phase2_seconds_shortlist0']:.0f} s), shortlist {shortlist} "
                   f"{rows[name][1]:.1f} ({figures[f'phase2_seconds_shortlist{shortlist}']:.0f}"
                   f" s); {time.perf_counter() - began:.0f} s in all")
    full = sorted(rows, key=lambda n: rows[n][0])
    short = sorted(rows, key=lambda n: rows[n][1])
    click.echo(f"order, full head: {' < '.join(full)}")
    click.echo(f"order, shortlist: {' < '.join(short)}")
    click.echo(f"same order: {full == short}")
