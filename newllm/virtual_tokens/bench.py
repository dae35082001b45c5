"""The virtual-token line's benchmarks: batched extract-pairs and batched e* optimization
against one token / one pair at a time."""

from __future__ import annotations

import time

import click
import torch

from newllm.core.base import BaseParams, load_base
from newllm.core.bench import bench, stage_checked, stage_default, timed
from newllm.core.data import load_split


@bench.command("extract-pairs")
@click.option("--model", default=stage_default(BaseParams, "model"), show_default=True,
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

    from newllm.core.hidden import resolve_layer_index
    from newllm.core.tokens import separator_token_id
    from newllm.virtual_tokens.pairs import extract_hidden, ordinary_token_ids
    from newllm.virtual_tokens.stages.extract_pairs import ExtractPairsParams

    # extract-pairs' own checks, before any model loads
    stage_checked(ExtractPairsParams, max_tokens=("--num-tokens", num_tokens),
                  batch_size=("--batch-size", batch_size))
    stage_checked(ExtractPairsParams, max_tokens=("--exact-tokens", exact_tokens))
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


@bench.command("e-star")
@click.option("--model", default=stage_default(BaseParams, "model"), show_default=True,
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
    from newllm.core.tokens import separator_token_id
    from newllm.virtual_tokens.e_star import (
        EStarConfig,
        check_context_fits,
        make_pairs,
        optimize_batch,
    )
    from newllm.virtual_tokens.stages.build_e_star import BuildEStarParams

    # build-e-star's own checks, before any model loads
    stage_checked(BuildEStarParams, batch_size=("--pairs", pairs), steps=("--steps", steps),
                  text_tokens=("--text-tokens", text_tokens),
                  follow_tokens=("--follow-tokens", follow_tokens))
    base = load_base(model, device=device)
    check_context_fits(base.model, 1 + text_tokens + follow_tokens,
                       "1 + --text-tokens + --follow-tokens")
    sep = separator_token_id(base.tokenizer)
    docs, _ = load_split(data, "train", base=base.info.tokenizer_only()).documents()
    chosen = make_pairs(docs, pairs, text_tokens, follow_tokens, 0, f"--data {data}")
    texts, follows = [t for _, t, _ in chosen], [f for _, _, f in chosen]
    config = EStarConfig(steps=steps, batch_size=pairs)
    optimize_batch(base.model, EStarConfig(steps=1), sep, texts[:1], follows[:1])  # warm-up
    batched, fast_s = timed(lambda: optimize_batch(base.model, config, sep, texts, follows))
    alone, naive_s = timed(lambda: [optimize_batch(base.model, config, sep, [t], [f])
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
