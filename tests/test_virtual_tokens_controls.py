"""eval-compressor's controls and intervals: the constants of the training e*, random vectors of
their norm, the derangement of the shuffled controls, and the paired bootstrap intervals (by
document) that every figure of the table carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from newllm.core.stats import bootstrap_interval, derangement
from newllm.virtual_tokens.evaluate import (
    mean_constant,
    norm_matched_constant,
    random_same_norm,
)
from newllm.virtual_tokens.stages.eval_compressor import seed_groups


def training_e_star(n: int = 40, k: int = 3, d: int = 16) -> torch.Tensor:
    """Diverse vectors around a shared direction, of norms that differ per position."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(k, d, generator=g)
    scale = torch.tensor([1.0, 4.0, 9.0])[:k, None]
    return (shared + 2.0 * torch.randn(n, k, d, generator=g)) * scale


def test_norm_matched_constant_has_the_training_mean_norm_and_the_mean_direction():
    e_star = training_e_star()
    constant = norm_matched_constant(e_star)
    mean = mean_constant(e_star)
    # per position: the mean norm of the training e* (computed here one vector at a time)
    for slot in range(e_star.shape[1]):
        norms = [float(v.norm()) for v in e_star[:, slot]]
        assert float(constant[slot].norm()) == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    assert torch.allclose(F.cosine_similarity(constant, mean, dim=-1), torch.ones(3), atol=1e-6)
    # the plain mean is much shorter than the vectors it averages: why the control is needed
    assert (mean.norm(dim=-1) < 0.7 * constant.norm(dim=-1)).all()


def test_random_vectors_have_that_norm_and_no_shared_direction():
    e_star = training_e_star()
    vectors = random_same_norm(200, e_star, seed=3)
    assert vectors.shape == (200, 3, 16)
    assert torch.allclose(vectors.norm(dim=-1), norm_matched_constant(e_star).norm(dim=-1)
                          .expand(200, -1), rtol=1e-5)
    cosine = F.cosine_similarity(vectors[:, 0], norm_matched_constant(e_star)[0][None], dim=-1)
    assert cosine.mean().abs() < 0.1  # random directions, not the mean's
    assert torch.equal(vectors, random_same_norm(200, e_star, seed=3))  # seeded
    assert not torch.equal(vectors, random_same_norm(200, e_star, seed=4))


@pytest.mark.parametrize("n", [2, 3, 8, 64, 65])
def test_the_derangement_moves_every_pair(n: int):
    order = derangement(n, seed=0)
    assert sorted(order) == list(range(n))  # a permutation: every pair's vectors used once
    assert all(order[i] != i for i in range(n))  # no pair reads its own vectors
    assert order == derangement(n, seed=0)


def test_a_planted_paired_difference_is_covered_and_a_null_one_covers_zero():
    rng = np.random.default_rng(0)
    planted, covered_zero, covered_planted, reps = 0.3, 0, 0, 200
    for _ in range(reps):
        # 64 pairs from 32 documents of two pairs each, with a per-document shared part
        documents = np.repeat(np.arange(32), 2)
        shared = rng.normal(0, 0.5, 32)[documents]
        null = shared + rng.normal(0, 1.0, 64)
        lo, hi = bootstrap_interval(null, groups=documents.tolist(), resamples=1000,
                                    seed=int(rng.integers(1 << 30)))
        covered_zero += lo <= 0.0 <= hi
        lo, hi = bootstrap_interval(null + planted, groups=documents.tolist(), resamples=1000,
                                    seed=int(rng.integers(1 << 30)))
        covered_planted += lo <= planted <= hi
    # nominal 95 %: the percentile bootstrap of 32 clusters runs a little narrow
    assert 0.88 <= covered_zero / reps <= 0.99
    assert 0.88 <= covered_planted / reps <= 0.99
    # and a planted difference of this size is told from 0 by one run of 64 pairs
    documents = np.repeat(np.arange(32), 2)
    values = np.random.default_rng(1).normal(0, 0.5, 64) + 0.5
    assert bootstrap_interval(values, groups=documents.tolist())[0] > 0


def test_runs_that_differ_only_in_their_seed_are_grouped():
    settings = {"hyper": {"arch": "hyper", "seed": 0, "name": "hyper", "lr": 1e-3},
                "hyper_s1": {"arch": "hyper", "seed": 1, "name": "hyper_s1", "lr": 1e-3},
                "qattn": {"arch": "qattn", "seed": 0, "name": "qattn", "lr": 1e-3},
                "hyper_lr": {"arch": "hyper", "seed": 1, "name": "hyper_lr", "lr": 1e-2}}
    assert seed_groups(settings) == [["hyper", "hyper_s1"]]
