"""Turning outputs into tags, and accuracy / macro-F1 with bootstrap confidence intervals."""

from __future__ import annotations

import re

import numpy as np

INVALID = ""  # a generation that names no tag


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def exact_tag(text: str, tags: tuple[str, ...]) -> str:
    """The tag a generation is, as LaMP scores it: its first line equals a tag (ignoring case,
    punctuation and a leading 'Tag:'/'Answer:'); else INVALID."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(tag|answer)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
    return {_norm(t): t for t in tags}.get(_norm(line), INVALID)


def parse_tag(text: str, tags: tuple[str, ...]) -> str:
    """The tag a generation answers: the exact tag (`exact_tag`), else the first tag it names
    as a word ("This movie belongs to the genre of Thriller." -> Thriller; at one position the
    longest tag wins); else INVALID. Small models rarely answer with the bare tag."""
    exact = exact_tag(text, tags)
    if exact != INVALID:
        return exact
    said = f" {_norm(text)} "
    found = [(said.find(f" {_norm(t)} "), -len(_norm(t)), t) for t in tags]
    found = [f for f in found if f[0] >= 0]
    return min(found)[2] if found else INVALID


def names_a_tag(text: str, tags: tuple[str, ...]) -> bool:
    """Whether a text mentions any tag as a word (the label-leak check of neutral texts)."""
    said = f" {_norm(text)} "
    return any(f" {_norm(t)} " in said for t in tags)


def macro_f1(gold: list[str], pred: list[str], tags: tuple[str, ...]) -> float:
    """Mean F1 over the tags that occur in gold or (valid) predictions; an invalid prediction
    counts as a miss of its gold tag."""
    labels = [t for t in tags if t in set(gold) or t in set(pred)]
    f1s = []
    for t in labels:
        tp = sum(g == t and p == t for g, p in zip(gold, pred, strict=True))
        fp = sum(g != t and p == t for g, p in zip(gold, pred, strict=True))
        fn = sum(g == t and p != t for g, p in zip(gold, pred, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s)) if f1s else 0.0


def macro_f1_resampled(gold: list[str], pred: list[str], tags: tuple[str, ...],
                       index: np.ndarray) -> np.ndarray:
    """`macro_f1` of every resample (rows of `index`) at once, by per-tag counts."""
    code = {t: i for i, t in enumerate(tags)}
    k = len(tags)
    g = np.array([code[t] for t in gold])
    p = np.array([code.get(t, k) for t in pred])  # k = invalid
    gi, pi = g[index], p[index]  # [R, n]
    tp = np.stack([((gi == c) & (pi == c)).sum(1) for c in range(k)], 1)
    gold_n = np.stack([(gi == c).sum(1) for c in range(k)], 1)
    pred_n = np.stack([(pi == c).sum(1) for c in range(k)], 1)
    present = (gold_n + pred_n) > 0
    f1 = np.where(present, 2 * tp / np.maximum(gold_n + pred_n, 1), 0.0)
    return np.where(present.any(1), f1.sum(1) / np.maximum(present.sum(1), 1), 0.0)


def resamples(n: int, count: int, seed: int) -> np.ndarray:
    """`count` bootstrap resamples of n items: an index matrix [count, n]."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def bootstrap_ci(gold: list[str], pred: list[str], tags: tuple[str, ...], index: np.ndarray
                 ) -> dict[str, float]:
    """Accuracy and macro-F1 with 95% percentile intervals over the resamples `index`."""
    g, p = np.array(gold, dtype=object), np.array(pred, dtype=object)
    correct = (g == p).astype(float)
    accs = correct[index].mean(1)
    f1s = macro_f1_resampled(gold, pred, tags, index)
    return {"accuracy": float(correct.mean()),
            "accuracy_lo": float(np.percentile(accs, 2.5)),
            "accuracy_hi": float(np.percentile(accs, 97.5)),
            "macro_f1": macro_f1(gold, pred, tags),
            "macro_f1_lo": float(np.percentile(f1s, 2.5)),
            "macro_f1_hi": float(np.percentile(f1s, 97.5))}


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, index: np.ndarray
                     ) -> dict[str, float]:
    """Accuracy of a minus b on the same questions: the difference, its 95% interval over
    paired resamples, and the share of resamples where a is not better (one-sided p)."""
    diff = correct_a.astype(float) - correct_b.astype(float)
    means = diff[index].mean(1)
    return {"diff": float(diff.mean()), "lo": float(np.percentile(means, 2.5)),
            "hi": float(np.percentile(means, 97.5)), "p_not_better": float((means <= 0).mean())}


def entropy(logprobs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the distribution over tags that the tags' log-probabilities give."""
    z = logprobs - logprobs.max(1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return -(prob * np.log(np.clip(prob, 1e-300, None))).sum(1)
