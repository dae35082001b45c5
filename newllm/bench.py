"""`newllm bench <name>`: each fast path against its naive reference, measured in one run.

Every benchmark prints both results (they must agree) and, as its last line,
`<name> speedup: <ratio>x`. Defaults of what a stage also has (model, data) are the
stage's own, so the benchmark measures what the pipeline runs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

from newllm.base import BaseParams, load_base
from newllm.data import load_split
from newllm.params import field_specs
from newllm.ppl import (
    HFScorer,
    Window,
    build_streams,
    evaluate_ppl,
    window_batches,
    window_spans,
)
from newllm.runtime import slow_bfloat16
from newllm.stages.eval_ppl import EvalPplParams
from newllm.stages.phase2_prep_cache import PrepCacheParams

T = TypeVar("T")


@click.group("bench")
def bench() -> None:
    """Benchmarks: fast path vs naive reference on the same inputs, printed as ratios."""


def _default(params_class: type, key: str) -> Any:
    """A stage's own default (params.yaml agrees with it; tests/test_params_defaults.py)."""
    return {spec.name: spec.default for spec in field_specs(params_class)}[key]


def gemm_peak_gflops(shapes: set[tuple[int, int]], rows: int, dtype: torch.dtype,
                     seconds: float = 0.3) -> float:
    """The best GFLOP/s of [rows, k] @ [k, n] over the model's (k, n) weight shapes."""
    best = 0.0
    generator = torch.Generator().manual_seed(0)
    for k, n in sorted(shapes):
        a = torch.randn(rows, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        a @ b  # warm-up
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or reps < 2:
            a @ b
            reps += 1
        best = max(best, 2 * rows * k * n * reps / elapsed / 1e9)
    return best


def linear_shapes(model: torch.nn.Module) -> tuple[set[tuple[int, int]], int, int]:
    """(in, out) shapes of the model's linear layers, their weights below the LM head, and the
    head's size; the head is `get_output_embeddings()`."""
    head = model.get_output_embeddings()
    body = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    shapes = {(m.in_features, m.out_features) for m in body}
    shapes.add((head.in_features, head.out_features))
    return shapes, sum(m.weight.numel() for m in body), head.weight.numel()


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


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@bench.command("eval-ppl")
@click.option("--model", default=_default(BaseParams, "model"), show_default=True,
              help="Base model (as base.model).")
@click.option("--data", default=_default(EvalPplParams, "data"), show_default=True,
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
    base = load_base(model, device=device)
    scorer = HFScorer.from_base(base)
    split = load_split(data, "val", base=base.info.tokenizer_only())
    sep = scorer.separator_id

    docs, texts = split.documents(max_tokens)
    args = (scorer, docs, texts, sep, context_length, stride, batch_size, "stream")
    evaluate_ppl(scorer, docs[:1], texts[:1], *args[3:])  # warm-up: first-call allocations
    fast, fast_s = _timed(lambda: evaluate_ppl(*args))
    naive, naive_s = _timed(lambda: evaluate_ppl(*args, naive=True))

    stage = {k: _default(EvalPplParams, k)
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
    fp32, fp32_s = _timed(lambda: evaluate_ppl(scorer, docs, texts, *settings))
    # bf16 vs fp32 on the same documents; a CPU without native bf16 runs it about 100x slower,
    # so there both are timed on a few hundred tokens only.
    native = not slow_bfloat16(base.device)
    bf16_docs, bf16_texts = (docs, texts) if native else split.documents(256)
    bf16_scorer = HFScorer.from_base(load_base(model, dtype="bfloat16", device=device))
    evaluate_ppl(bf16_scorer, bf16_docs[:1], bf16_texts[:1], *settings)  # warm-up
    bf16, bf16_s = _timed(lambda: evaluate_ppl(bf16_scorer, bf16_docs, bf16_texts, *settings))
    same_fp32, same_fp32_s = (fp32, fp32_s) if native else _timed(
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


@bench.command("extract-pairs")
@click.option("--model", default=_default(BaseParams, "model"), show_default=True,
              help="Base model (as base.model).")
@click.option("--layer-index", default=-1, show_default=True,
              help="Hidden state to take (HF hidden_states index).")
@click.option("--num-tokens", default=512, show_default=True,
              help="Ordinary vocabulary ids to extract, the same for both paths.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--exact-tokens", default=16, show_default=True,
              help="Ids also compared in float64, where rounding cannot hide a real difference.")
@click.option("--device", default="auto", show_default=True)
def bench_extract_pairs(model: str, layer_index: int, num_tokens: int, batch_size: int,
                        exact_tokens: int, device: str) -> None:
    """Batched, early-stopped extract-pairs vs one full forward per token (same X, speed ratio).

    The reference is the plain way to get the pairs: one `[sep, token]` forward pass per
    token through the whole model and LM head with output_hidden_states, taking
    hidden_states[layer].
    """
    import copy

    from newllm.hidden import resolve_layer_index
    from newllm.tokens import separator_token_id
    from newllm.virtual_tokens.pairs import extract_hidden, ordinary_token_ids

    base = load_base(model, device=device)
    layer = resolve_layer_index(layer_index, base.info.num_layers, "--layer-index")
    ids, _ = ordinary_token_ids(base.tokenizer, base.model.get_input_embeddings().num_embeddings,
                                num_tokens)
    prefix_id = separator_token_id(base.tokenizer)  # as extract-pairs reads each token

    @torch.inference_mode()
    def one_at_a_time(lm: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for token in token_ids.tolist():
            inputs = torch.tensor([[prefix_id, token]], device=base.device)
            rows.append(lm(input_ids=inputs, output_hidden_states=True,
                           use_cache=False).hidden_states[layer][0, -1].cpu())
        return torch.stack(rows)

    extract_hidden(base.model, ids[:8], layer, prefix_id, batch_size, base.device)  # warm-up
    one_at_a_time(base.model, ids[:2])
    start = time.perf_counter()
    fast = extract_hidden(base.model, ids, layer, prefix_id, batch_size, base.device)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = one_at_a_time(base.model, ids).float()
    naive_s = time.perf_counter() - start
    per_token = (fast - naive).abs().amax(dim=1)
    diff = per_token.max().item()

    exact = copy.deepcopy(base.model).double()
    exact_ids = ids[:exact_tokens]
    exact_fast = extract_hidden(exact, exact_ids, layer, prefix_id, batch_size, base.device)
    exact_diff = (exact_fast.double() - one_at_a_time(exact, exact_ids)).abs().max().item()

    click.echo(f"tokens {len(ids)}, layer {layer} of {base.info.num_layers}, batch {batch_size}, "
               f"device {base.device}, dtype {base.model.dtype}")
    click.echo(f"batched:      {fast_s:.2f}s, {len(ids) / fast_s:.1f} tokens/s")
    click.echo(f"one at a time: {naive_s:.2f}s, {len(ids) / naive_s:.1f} tokens/s")
    # float32 GEMMs round differently for different batch shapes, and the hidden states of
    # a few rare tokens amplify that; a float64 copy shows whether the computations are the
    # same (only HF's RMSNorm, which always computes in float32, still rounds there).
    click.echo(f"X max abs diff in {str(fast.dtype).removeprefix('torch.')}: {diff:.2e} "
               f"({diff / naive.abs().max().item():.1e} of max |X|), median over tokens "
               f"{per_token.median().item():.2e}, tokens over 1e-5: "
               f"{int((per_token > 1e-5).sum())}/{len(ids)}")
    click.echo(f"X max abs diff with a float64 model ({len(exact_ids)} ids): {exact_diff:.2e}")
    click.echo(f"extract-pairs speedup: {naive_s / fast_s:.2f}x")


_RSS_PROBE = """
import resource, sys
from newllm.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    if done.code:
        raise
print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@bench.command("prep-cache")
@click.option("--model", default=_default(BaseParams, "model"), show_default=True,
              help="Base model whose input embeddings the blocks read.")
@click.option("--blocks", default=_default(PrepCacheParams, "blocks"), show_default=True,
              help="Phase-1 blocks; if the file is missing, freshly initialised blocks of "
                   "the phase1 defaults are used (same speed, same exactness).")
@click.option("--data", default=_default(PrepCacheParams, "data"), show_default=True)
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
    import copy
    import subprocess
    import sys
    import tempfile

    from newllm.cvfp.checkpoint import load_blocks, save_blocks, token_stream
    from newllm.cvfp.model import CVFPLM, CVFPConfig
    from newllm.cvfp.recurrence import naive_contexts, stream_contexts
    from newllm.stages.phase1_context import Phase1Params
    from newllm.tokens import separator_token_id

    base = load_base(model, device="cpu")
    embeddings = base.input_embeddings()
    scratch = Path(tempfile.mkdtemp(prefix="newllm-bench-"))
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
        click.echo(f"no blocks artifact: freshly initialised phase1 defaults in {blocks}")
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
        (out, seconds) = _timed(lambda m=method, n=n: stream_contexts(cvfp, stream[:n],
                                                                     chunk_tokens=8192,
                                                                     method=m))
        results[method] = (out, n / seconds)
    reference, seconds = _timed(lambda: naive_contexts(cvfp, stream[:naive_tokens]))
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
    shutil.rmtree(scratch, ignore_errors=True)
    click.echo(f"prep-cache speedup: {results['sequential'][1] / naive_rate:.1f}x")


@bench.command("e-star")
@click.option("--model", default=_default(BaseParams, "model"), show_default=True,
              help="Base model (as base.model).")
@click.option("--data", default="data/prepared", show_default=True,
              help="Prepared data (build_e_star.data): pairs from train documents.")
@click.option("--pairs", default=24, show_default=True,
              help="(text, follow_text) pairs (build_e_star.batch_size: one batch).")
@click.option("--steps", default=5, show_default=True, help="Adam steps for each path.")
@click.option("--text-tokens", default=32, show_default=True)
@click.option("--follow-tokens", default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
def bench_e_star(model: str, data: str, pairs: int, steps: int, text_tokens: int,
                 follow_tokens: int, device: str) -> None:
    """build-e-star's batched e* optimization (all pairs in one padded batch) vs one pair at
    a time, same pairs, steps and settings: final KLs must match; the time ratio is printed."""
    from newllm.tokens import separator_token_id
    from newllm.virtual_tokens.e_star import EStarConfig, make_pairs, optimize_batch

    base = load_base(model, device=device)
    sep = separator_token_id(base.tokenizer)
    docs, _ = load_split(data, "train", base=base.info.tokenizer_only()).documents()
    chosen = make_pairs(docs, pairs, text_tokens, follow_tokens, 0, f"--data {data}")
    texts, follows = [t for _, t, _ in chosen], [f for _, _, f in chosen]
    config = EStarConfig(steps=steps, batch_size=pairs)
    optimize_batch(base.model, EStarConfig(steps=1), sep, texts[:1], follows[:1])  # warm-up
    batched, fast_s = _timed(lambda: optimize_batch(base.model, config, sep, texts, follows))
    alone, naive_s = _timed(lambda: [optimize_batch(base.model, config, sep, [t], [f])
                                     for t, f in zip(texts, follows, strict=True)])
    naive_kl = torch.cat([r.final_loss for r in alone])
    diff = (batched.final_loss - naive_kl).abs().max().item()
    e_diff = (batched.e_star - torch.cat([r.e_star for r in alone])).abs().max().item()
    click.echo(f"pairs {pairs} ({text_tokens} + {follow_tokens} tokens), k 1, steps {steps}, "
               f"device {base.device}, threads {torch.get_num_threads()}")
    click.echo(f"batched:       {fast_s:.2f}s, mean final KL {batched.final_loss.mean():.5f}")
    click.echo(f"one at a time: {naive_s:.2f}s, mean final KL {naive_kl.mean():.5f}")
    click.echo(f"max |final KL difference| {diff:.2e}, max |e* difference| {e_diff:.2e}")
    click.echo(f"e-star speedup: {naive_s / fast_s:.2f}x")
