"""newllm.core.stats against independent computations (scipy, hand formulas, simulation)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from newllm.core.stats import (
    bootstrap_interval,
    derangement,
    mean_sd,
    null_rank_p,
    wilson_interval,
)


def test_mean_sd_matches_numpy_sample_sd() -> None:
    values = [1.0, 2.5, 4.0, 7.5]
    result = mean_sd(values)
    assert result["n"] == 4
    assert result["mean"] == pytest.approx(3.75)
    assert result["sd"] == pytest.approx(np.std(values, ddof=1))
    assert mean_sd([3.0])["sd"] == 0.0


def test_wilson_matches_scipy() -> None:
    for successes, n in [(0, 20), (3, 20), (50, 100), (100, 100), (7, 113)]:
        expected = scipy_stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
        low, high = wilson_interval(successes, n)
        assert low == pytest.approx(expected.low, abs=1e-9)
        assert high == pytest.approx(expected.high, abs=1e-9)


def test_bootstrap_covers_a_planted_mean_and_zero_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(1)
    planted_hits = null_hits = 0
    trials = 200
    for trial in range(trials):
        planted = rng.normal(0.5, 1.0, size=60)
        low, high = bootstrap_interval(planted, resamples=800, seed=trial)
        planted_hits += low <= 0.5 <= high
        null = rng.normal(0.0, 1.0, size=60)
        low, high = bootstrap_interval(null, resamples=800, seed=trial)
        null_hits += low <= 0.0 <= high
    # 95 % nominal; the percentile bootstrap at n = 60 runs a little under it.
    assert 0.88 <= planted_hits / trials <= 0.99
    assert 0.88 <= null_hits / trials <= 0.99


def test_cluster_bootstrap_is_wider_when_items_of_a_group_move_together() -> None:
    rng = np.random.default_rng(0)
    group_effect = np.repeat(rng.normal(0, 1.0, size=10), 8)  # 10 documents x 8 items
    values = group_effect + rng.normal(0, 0.1, size=80)
    groups = np.repeat(np.arange(10), 8)
    naive = bootstrap_interval(values, seed=0)
    clustered = bootstrap_interval(values, groups=groups, seed=0)
    assert clustered[1] - clustered[0] > 2 * (naive[1] - naive[0])
    # one item per group: the cluster bootstrap is the plain one on the same draws' scale
    single = bootstrap_interval(values[:10], groups=list(range(10)), seed=3)
    assert single[0] < values[:10].mean() < single[1]


def test_null_rank_p_counts_ties_against_the_observed_value() -> None:
    null = [0.1, 0.2, 0.3, 0.5]
    assert null_rank_p(0.6, null) == {"rank": 1, "p": 1 / 5, "n_null": 4}
    assert null_rank_p(0.3, null) == {"rank": 3, "p": 3 / 5, "n_null": 4}
    assert null_rank_p(0.15, null, larger_is_better=False)["p"] == 2 / 5
    # with 19 draws the smallest reachable p is 0.05
    assert null_rank_p(100.0, list(range(19)))["p"] == pytest.approx(0.05)


def test_derangement_moves_every_item_and_is_seeded() -> None:
    for n in (2, 3, 10, 64):
        order = derangement(n, seed=5)
        assert sorted(order) == list(range(n))
        assert all(order[i] != i for i in range(n))
    assert derangement(64, seed=5) == derangement(64, seed=5)
    assert derangement(64, seed=5) != derangement(64, seed=6)
    with pytest.raises(ValueError):
        derangement(1, seed=0)
