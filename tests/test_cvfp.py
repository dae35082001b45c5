"""CVFP (seeds/001, seeds/003): the model's math, phase 1, the context cache and phase 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from newllm.core.errors import NewllmError
from newllm.core.train import TrainConfig
from newllm.cvfp.cache import load_cache, write_cache
from newllm.cvfp.model import CVFPLM, ContextBlock, ContextLayer, CVFPConfig
from newllm.cvfp.phase1 import (
    Phase1Config,
    block_slices,
    diversity_loss,
    effective_rank,
    lipschitz_estimate,
    shifted,
    train_block,
)
from newllm.cvfp.phase2 import evaluate, train_token_block
from newllm.cvfp.recurrence import (
    StackedBlocks,
    block_contexts,
    chunked_contexts,
    cpu_scan,
    naive_contexts,
    sequential_scan,
    stream_contexts,
)

VOCAB, EMBED = 50, 12


def tiny_lm(layers: int = 1, blocks: int = 2, norm: str = "layernorm", seed: int = 0,
            **options) -> CVFPLM:
    torch.manual_seed(seed)
    config = CVFPConfig(VOCAB, EMBED, blocks, layers, layers, 6, norm, **options)
    return CVFPLM(config, torch.randn(VOCAB, EMBED))


def test_context_layer_step_by_hand():
    layer = ContextLayer(2, 1, normalize=False)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
        layer.linear.bias.copy_(torch.tensor([0.1, 0.2]))
    c, e = torch.tensor([1.0, 2.0]), torch.tensor([4.0])
    # W [c, e] + b = [1 - 4 + 2 + 0.1, 2 - 4 + 0.2] = [-0.9, -1.8] -> ReLU 0: c unchanged
    assert torch.equal(layer(c, e), c)
    c = torch.tensor([3.0, 1.0])  # [3 - 2 + 2 + 0.1, 1 - 4 + 0.2] = [3.1, -2.8]
    assert torch.allclose(layer(c, e), torch.tensor([6.1, 1.0]))
    normed = ContextLayer(2, 1, normalize=True)
    normed.load_state_dict(layer.state_dict())
    out = np.array([6.1, 1.0])
    expected = (out - out.mean()) / np.sqrt(out.var() + 1e-5)
    assert np.allclose(normed(c, e).detach().numpy(), expected, atol=1e-6)


def test_without_norm_contexts_only_grow_along_a_stream():
    model = tiny_lm(norm="none")
    contexts = naive_contexts(model, torch.randint(0, VOCAB, (200,)))[:, -1]
    assert (contexts[1:] >= contexts[:-1]).all()
    assert torch.isfinite(contexts).all()  # the -I start keeps them bounded


@pytest.mark.parametrize("norm", ["layernorm", "none"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("method", ["sequential", "picard"])
def test_chunked_cache_equals_the_per_token_loop(norm, layers, method):
    model = tiny_lm(layers, norm=norm)
    ids = torch.randint(0, VOCAB, (333,))
    expected = naive_contexts(model, ids)  # [T, layers, 2 * 6]
    assert expected.shape == (333, layers, 12)
    chunks = list(chunked_contexts(model, ids, chunk_tokens=50, method=method))
    assert len(chunks) == 7  # the context is carried across chunk boundaries
    got = torch.cat([c.contexts for c in chunks])
    assert torch.allclose(got, expected, atol=1e-5)
    if method == "picard":
        assert all(1 <= s <= 50 for c in chunks for s in c.sweeps)


@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_compiled_cpu_kernel_equals_the_torchscript_loop(norm):
    """The numba kernel (CPU, float32/64) and the TorchScript loop (other devices and
    dtypes) are two implementations of one recurrence: same contexts, E-variant included."""
    model = tiny_lm(2, blocks=3, norm=norm).double()
    blocks = StackedBlocks.of(model.context_blocks, dtype=torch.float64)
    parts = blocks.embedding_parts(model.embed(torch.randint(0, VOCAB, (120,))))
    assert parts.shape == (120, 2, 3, 6)
    context = torch.randn(3, 6, dtype=torch.float64)
    expected = sequential_scan(blocks.context_weights, parts, context, blocks.normalize)
    got = cpu_scan(blocks.context_weights, parts, context, blocks.normalize)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)


def test_picard_stops_once_a_sweep_changes_nothing():
    model = tiny_lm(norm="none")
    with torch.no_grad():
        for block in model.context_blocks:  # c' = c + ReLU(u - c) = max(c, u)
            block.layers[0].linear.weight[:, :6] = -torch.eye(6)
    ids = torch.full((256,), 7)  # one token throughout: every context is max(0, u)
    chunk = next(chunked_contexts(model, ids, chunk_tokens=256, method="picard"))
    assert chunk.sweeps == [2]  # the second sweep certifies the first
    assert torch.allclose(chunk.contexts, naive_contexts(model, ids), atol=1e-5)


def test_diversity_terms_against_numpy():
    x = torch.randn(40, 7, generator=torch.Generator().manual_seed(1)) + 2.0
    a = x.numpy().astype(np.float64)
    mean = a.mean(axis=0)
    dispersion = -np.sqrt(((a - mean) ** 2).sum()) / len(a)
    assert float(diversity_loss(x, "dispersion", 0.1)) == pytest.approx(dispersion, rel=1e-5)
    assert float(diversity_loss(x, "oacd", 0.1)) == pytest.approx(
        dispersion + 0.1 * (mean ** 2).sum(), rel=1e-5)


def test_effective_rank_of_known_matrices():
    value, dims, percent = effective_rank(torch.eye(8))
    assert value == pytest.approx(8.0) and dims == 8 and percent == pytest.approx(100.0)
    rank_one = torch.outer(torch.arange(1.0, 11.0), torch.randn(5))
    assert effective_rank(rank_one)[0] == pytest.approx(1.0, abs=1e-4)


def test_lipschitz_estimate_of_a_linear_map():
    matrix = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    expected = float(torch.linalg.matrix_norm(matrix, ord=2))
    states = torch.randn(5, 6)
    top, mean = lipschitz_estimate(lambda c: c @ matrix.T, states,
                                   torch.Generator().manual_seed(0), iterations=200)
    assert top == pytest.approx(expected, rel=1e-3) and mean == pytest.approx(expected, rel=1e-3)


def test_parallel_iteration_is_exact_on_the_first_k_positions():
    block = tiny_lm(norm="none").context_blocks[0]
    embeddings = torch.randn(30, EMBED)
    sequential = block_contexts(block, embeddings, block.initial_context)
    previous = torch.randn(30, 6)
    with torch.no_grad():
        for k in range(1, 6):
            previous = block(shifted(previous, block.initial_context), embeddings)
            assert torch.allclose(previous[:k], sequential[:k], atol=1e-5)
            assert not torch.allclose(previous[k + 1:], sequential[k + 1:], atol=1e-3)


def frozen_config(**options) -> Phase1Config:
    return Phase1Config(**{"lr": 1e-30, "convergence_target": 2.0, "lipschitz_samples": 4,
                           **options})


def test_iteration_zero_is_the_sequential_recurrence():
    block = tiny_lm().context_blocks[0]
    embeddings = torch.randn(40, EMBED)
    _, last = train_block(block, embeddings, embeddings[:10],
                          frozen_config(max_iterations=1), torch.Generator())
    # the sequential contexts are a fixed point of the shifted iteration: one parallel
    # iteration from them (with no learning) gives them back
    assert torch.allclose(last, block_contexts(block, embeddings, block.initial_context),
                          atol=1e-5)


def test_contexts_are_carried_between_iterations_not_reset():
    block = tiny_lm(norm="none").context_blocks[0]
    embeddings = torch.randn(40, EMBED)
    noise = 0.01 * torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    _, last = train_block(block, embeddings, embeddings[:10],
                          frozen_config(max_iterations=3, init="noise"),
                          torch.Generator().manual_seed(3))
    expected = noise
    with torch.no_grad():
        for _ in range(3):  # iterate on the previous output, never restart from the noise
            expected = block(shifted(expected, block.initial_context), embeddings)
    assert torch.allclose(last, expected, atol=1e-6)


def test_phase1_training_changes_the_block_and_records_every_iteration():
    block = tiny_lm().context_blocks[0]
    before = [p.clone() for p in block.parameters()]
    records, _ = train_block(block, torch.randn(64, EMBED), torch.randn(20, EMBED),
                             Phase1Config(max_iterations=3, convergence_target=1.0,
                                          lipschitz_samples=4, batch_size=16),
                             torch.Generator().manual_seed(0))
    assert records[0]["iteration"] == 0 and len(records) >= 2
    assert any(not torch.equal(a, b) for a, b in zip(before, block.parameters(), strict=True))
    assert all(0 <= r.get("convergence_rate", 0) <= 1 for r in records)


def test_block_slices_are_disjoint_or_shared():
    slices = block_slices(3, 10, "split", 40)
    covered = [set(range(40)[s]) for s in slices]
    assert all(len(c) == 10 for c in covered)
    assert not (covered[0] & covered[1]) and not (covered[1] & covered[2])
    assert block_slices(3, 10, "all", 40) == [slice(0, 30)] * 3
    with pytest.raises(NewllmError, match="phase1_context needs 3 x 20"):
        block_slices(3, 20, "split", 40)


def test_mismatched_layer_counts_are_a_clear_error():
    with pytest.raises(NewllmError, match=r"context_layers \(2\) must equal .*token_layers \(1\)"):
        CVFPConfig(VOCAB, EMBED, 1, 2, 1)


def test_phase2_learns_and_leaves_frozen_parts_alone():
    model = tiny_lm()
    pattern = torch.arange(10).repeat(40)  # a predictable stream
    contexts = stream_contexts(model, pattern, chunk_tokens=64)
    blocks_before = {k: v.clone() for k, v in model.context_blocks.state_dict().items()}
    embedding_before = model.embedding.detach().clone()
    separator = VOCAB - 1
    first, _, _ = evaluate(model, contexts, pattern, separator, torch.device("cpu"))
    history = train_token_block(model, (contexts, pattern), (contexts, pattern), separator,
                                TrainConfig("phase2_token", 20, 32, 1e-2),
                                torch.Generator().manual_seed(0))
    assert history[-1].val_loss < 0.5 * first
    assert all(torch.equal(v, model.context_blocks.state_dict()[k])
               for k, v in blocks_before.items())
    assert torch.equal(model.embedding, embedding_before)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.token_block.parameters())


def test_cache_round_trip_and_blocks_check(tmp_path):
    model = tiny_lm(layers=2)
    ids = torch.randint(0, VOCAB, (130,))
    stats = write_cache(tmp_path, model, {"train": ids, "val": ids[:20]}, chunk_tokens=32,
                        cache_dtype=torch.float32, method="sequential",
                        compute_dtype=torch.float32, device=torch.device("cpu"),
                        tolerance=1e-6, provenance={"params": {}, "base": None,
                                                    "blocks_hash": "abc"})
    assert stats["train"].chunks == 5 and stats["train"].tokens == 130
    contexts, token_ids = load_cache(tmp_path, "train", "abc", None, 100)
    assert torch.equal(token_ids, ids[:100])
    assert torch.allclose(contexts, naive_contexts(model, ids)[:100], atol=1e-5)
    with pytest.raises(NewllmError, match="other context blocks"):
        load_cache(tmp_path, "train", "other", None)
    with pytest.raises(NewllmError, match="fewer than the 500 asked for"):
        load_cache(tmp_path, "val", "abc", None, 500)


def test_context_block_forward_with_intermediates():
    block = ContextBlock(4, EMBED, 3)
    context, embedding = torch.randn(4), torch.randn(EMBED)
    outputs = block.forward_with_intermediates(context, embedding)
    assert len(outputs) == 3
    assert torch.equal(outputs[0], block.layers[0](context, embedding))
    assert torch.equal(outputs[2], block.layers[2](outputs[1], embedding))
    assert torch.equal(block(context, embedding), outputs[-1])
