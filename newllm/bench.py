"""`newllm bench <name>`: each fast path against its naive reference, measured in one run.

Every benchmark prints both results (they must agree) and, as its last line,
`<name> speedup: <ratio>x`.
"""

from __future__ import annotations

import time

import click

from newllm.base import load_base
from newllm.data import load_split
from newllm.ppl import evaluate_ppl


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
    scorer = HFScorer.from_base(base)
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


@bench.command("extract-pairs")
@click.option("--model", default="data/assets/smollm2-135m", show_default=True,
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

    The reference is the plain way to get the pairs: one `[BOS, token]` forward pass per
    token through the whole model and LM head with output_hidden_states, taking
    hidden_states[layer].
    """
    import copy

    import torch

    from newllm.hidden import resolve_layer_index
    from newllm.virtual_tokens.pairs import bos_token_id, extract_hidden, ordinary_token_ids

    base = load_base(model, device=device)
    layer = resolve_layer_index(layer_index, base.info.num_layers, "--layer-index")
    ids, _ = ordinary_token_ids(base.tokenizer, base.model.get_input_embeddings().num_embeddings,
                                num_tokens)
    bos = bos_token_id(base.tokenizer, base.model)

    @torch.inference_mode()
    def one_at_a_time(lm: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for token in token_ids.tolist():
            inputs = torch.tensor([[bos, token]], device=base.device)
            rows.append(lm(input_ids=inputs, output_hidden_states=True,
                           use_cache=False).hidden_states[layer][0, -1].cpu())
        return torch.stack(rows)

    extract_hidden(base.model, ids[:8], layer, bos, batch_size, base.device)  # warm-up
    one_at_a_time(base.model, ids[:2])
    start = time.perf_counter()
    fast = extract_hidden(base.model, ids, layer, bos, batch_size, base.device)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = one_at_a_time(base.model, ids).float()
    naive_s = time.perf_counter() - start
    per_token = (fast - naive).abs().amax(dim=1)
    diff = per_token.max().item()

    exact = copy.deepcopy(base.model).double()
    exact_ids = ids[:exact_tokens]
    exact_diff = (extract_hidden(exact, exact_ids, layer, bos, batch_size, base.device).double()
                  - one_at_a_time(exact, exact_ids)).abs().max().item()

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
