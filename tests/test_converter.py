"""Converter model, fitting, held-out split and token-recovery metrics (no base model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from newllm.core.errors import NewllmError
from newllm.virtual_tokens.converter import (
    Converter,
    ConverterConfig,
    load_converter,
    save_converter,
)
from newllm.virtual_tokens.fit import fit_converter, split_by_token
from newllm.virtual_tokens.recovery import mapping_metrics, nearest_tokens, topk_recovery

BASE = {"model_id": "m", "weights_hash": "w" * 64, "tokenizer_hash": "t" * 64}


def test_topk_recovery_hand_made_case():
    # Row 4 points like row 0 but is 10x longer: by dot product it would win for v0;
    # by cosine (what recovery uses) row 0 wins.
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [8.0, 6.0]])
    vectors = torch.tensor([[1.0, 0.1],    # token 0: nearest rows 0, 4, ...        -> rank 1
                            [0.6, 0.8],    # token 1: rows 4 (0.96), 1 (0.8), ...    -> rank 2
                            [-0.1, -1.0],  # token 2: rows 3 (0.995), 2 (0.0995)     -> rank 2
                            [1.0, 0.2]])   # token 3: rows 0, 4, 1 (0.196), 3        -> rank 4
    token_ids = torch.tensor([0, 1, 2, 3])
    assert topk_recovery(vectors, token_ids, embeddings, (1, 2, 3, 4)) == {
        1: 0.25, 2: 0.75, 3: 0.75, 4: 1.0}
    ids, sims = nearest_tokens(vectors[1:2], embeddings, 2)
    assert ids.tolist() == [[4, 1]]
    assert sims[0].tolist() == pytest.approx([0.96, 0.8])


def test_mapping_metrics_against_numpy():
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(50, 6, generator=g)
    ids = torch.tensor([3, 7, 11, 20, 49])
    targets = embeddings[ids]
    vectors = targets + 0.8 * torch.randn(5, 6, generator=g)
    got = mapping_metrics(vectors, targets, ids, embeddings, topk=3)
    v, t, e = vectors.numpy(), targets.numpy(), embeddings.numpy()
    cos = (v * t).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(t, axis=1)
    sims = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (
        e / np.linalg.norm(e, axis=1, keepdims=True)).T
    ranks = (sims > sims[np.arange(5), ids.numpy()][:, None]).sum(1)  # rows strictly closer
    assert got["mse"] == pytest.approx(((v - t) ** 2).mean(), rel=1e-5)
    assert got["cosine"] == pytest.approx(cos.mean(), rel=1e-5)
    assert got["top1"] == pytest.approx((ranks < 1).mean())
    assert got["top3"] == pytest.approx((ranks < 3).mean())


def test_split_by_token_is_seeded_disjoint_and_complete():
    ids = torch.arange(100, 200)
    train, val = split_by_token(ids, 0.25, torch.Generator().manual_seed(0))
    assert len(val) == 25 and len(train) == 75
    assert set(train.tolist()) | set(val.tolist()) == set(range(100))
    assert not set(ids[train].tolist()) & set(ids[val].tolist())
    again = split_by_token(ids, 0.25, torch.Generator().manual_seed(0))[1]
    other = split_by_token(ids, 0.25, torch.Generator().manual_seed(1))[1]
    assert torch.equal(val, again) and not torch.equal(val, other)


def _linear_problem(n: int = 600, seed: int = 0):
    """Pairs from a known affine map, with one huge and one tiny input dimension (like a
    residual stream's massive activations)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 0.01, 1.0])
    x = (torch.randn(n, 8, generator=g) + 3) * scale
    weight = torch.randn(8, 6, generator=g) / scale[:, None]
    bias = torch.randn(6, generator=g)
    return x, x @ weight + bias, weight, bias


def test_linear_converter_learns_an_exactly_linear_map():
    x, y, weight, bias = _linear_problem()
    g = torch.Generator().manual_seed(0)
    train, val = split_by_token(torch.arange(len(x)), 0.2, g)
    torch.manual_seed(0)
    converter = Converter(ConverterConfig("linear", 8, 6))
    history = fit_converter(converter, x[train], y[train], x[val], y[val], epochs=100,
                            batch_size=32, lr=3e-2, generator=g)
    assert len(history) == 100 and history[-1].epoch == 100
    assert history[-1].val_loss < 1e-6 * y.var().item()  # near-zero on held-out pairs
    assert history[0].train_loss > 1e3 * history[-1].train_loss
    # the learned map, undoing the input standardization, is the true one
    learned_weight = (converter.net.weight / converter.x_scale).T
    learned_bias = converter.net.bias - converter.x_mean @ learned_weight
    torch.testing.assert_close(learned_weight, weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(learned_bias, bias, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_mlp_converter_fits_too(compute_dtype):
    x, y, _, _ = _linear_problem()
    g = torch.Generator().manual_seed(0)
    train, val = split_by_token(torch.arange(len(x)), 0.2, g)
    torch.manual_seed(0)
    converter = Converter(ConverterConfig("mlp", 8, 6, hidden_dim=64))
    history = fit_converter(converter, x[train], y[train], x[val], y[val], epochs=60,
                            batch_size=32, lr=3e-3, generator=g, compute_dtype=compute_dtype)
    assert history[-1].val_loss < 1e-3 * y.var().item()
    assert all(p.dtype == torch.float32 and p.device.type == "cpu"
               for p in converter.parameters())


def test_nan_loss_is_a_clear_error():
    x, y, _, _ = _linear_problem(n=64)
    y[0, 0] = float("nan")
    converter = Converter(ConverterConfig("linear", 8, 6))
    with pytest.raises(NewllmError, match=r"train_converter\.lr"):
        fit_converter(converter, x, y, x[:4], y[:4], epochs=2, batch_size=16, lr=1e-3,
                      generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["linear", "mlp"])
def test_save_and_load_round_trip(tmp_path, model_type):
    converter = Converter(ConverterConfig(model_type, 8, 6, hidden_dim=16))
    x, y, _, _ = _linear_problem(n=32)
    converter.init_from_data(x, y)
    path = tmp_path / "c.safetensors"
    save_converter(path, converter, stage="test", params={}, base=BASE, layer=2, prefix_id=7,
                   tensors={"val_token_ids": torch.tensor([1, 2])})
    loaded, artifact = load_converter(path, BASE)
    assert loaded.config == converter.config
    assert artifact.meta["extra"]["layer_index"] == 2
    assert artifact.meta["extra"]["prefix_token_id"] == 7
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converter(x), rtol=0, atol=0)
