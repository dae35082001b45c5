"""The statistics every line reports its figures with: spread over seeds, bootstrap and
Wilson intervals (of one mean, or of the difference of two), a rank p-value against a null
distribution, a fixed derangement.

Pure numpy (no torch), seeded: the same inputs give the same interval on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_Z = {0.90: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}


def mean_sd(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (ddof=1; 0.0 for one value) and n."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_sd of no values")
    sd = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "sd": sd, "n": int(array.size)}


def bootstrap_interval(values: Sequence[float], groups: Sequence[object] | None = None,
                       resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`.

    With `groups` (one label per value, e.g. the document a pair comes from), whole groups
    are resampled with replacement (a cluster bootstrap): items of one document are not
    independent, and resampling them one by one would make the interval too narrow. For a
    paired comparison pass the per-item differences.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("bootstrap_interval of no values")
    rng = np.random.default_rng(seed)
    if groups is None:
        index = rng.integers(0, array.size, size=(resamples, array.size))
        means = array[index].mean(axis=1)
    else:
        if len(groups) != array.size:
            raise ValueError(f"{len(groups)} groups for {array.size} values")
        _, label = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        sums = np.bincount(label, weights=array)
        counts = np.bincount(label).astype(np.float64)
        drawn = rng.integers(0, sums.size, size=(resamples, sums.size))
        means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_difference(first: Sequence[float], second: Sequence[float],
                         resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """mean(first) - mean(second) of two independent samples (different items, e.g. two sets
    of facts) and its percentile bootstrap interval, each sample resampled on its own:
    (difference, low, high). For the same items measured twice, bootstrap_interval of the
    per-item differences is the sharper test."""
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap_difference of an empty sample")
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    means_b = b[rng.integers(0, b.size, size=(resamples, b.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means_a - means_b, [tail, 1.0 - tail])
    return float(a.mean() - b.mean()), float(low), float(high)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    if level not in _Z:
        raise ValueError(f"level must be one of {sorted(_Z)}")
    z = _Z[level]
    share = successes / n
    denominator = 1.0 + z * z / n
    centre = (share + z * z / (2 * n)) / denominator
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def null_rank_p(observed: float, null: Sequence[float],
                larger_is_better: bool = True) -> dict[str, float | int]:
    """Where `observed` stands among draws of a null distribution.

    `rank` is 1 + the number of null draws at least as good (1: better than all of them);
    p = (1 + #{null >= observed}) / (1 + N), the permutation-test p-value that counts the
    observed value as one of the draws, so it is never 0 and reaches 0.05 only with N >= 19.
    """
    draws = np.asarray(null, dtype=np.float64)
    if draws.size == 0:
        raise ValueError("null_rank_p needs at least one null draw")
    at_least = int((draws >= observed).sum() if larger_is_better
                   else (draws <= observed).sum())
    return {"rank": 1 + at_least, "p": (1 + at_least) / (1 + draws.size),
            "n_null": int(draws.size)}


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (n >= 2): item i is paired with
    item `result[i]`, never itself (e.g. a text read after another text's vector)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    rng = np.random.default_rng(seed)
    while True:  # a uniform permutation is a derangement with probability ~1/e
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return [int(i) for i in order]
