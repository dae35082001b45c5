"""Turning outputs into tags, and accuracy / macro-F1 with bootstrap confidence intervals.

Likelihood scoring reads every tag's summed log-probability after the prompt and picks an
answer in one of three views (`VIEWS`, the primary one first):
- `listed`: among the question's own candidates (`data.candidates`), the highest mean
  log-probability per token (so a short tag is not favoured for being short);
- `calibrated`: the same after subtracting each candidate's mean log-probability under the
  no-profile prompt of the same question (what the condition adds to the profile-free
  reading; undefined for the no-profile condition itself, where it is 0 everywhere);
- `all`: the seed's view, every tag of the task by summed log-probability.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from newllm.core.stats import bootstrap_interval, mean_sd, null_rank_p

INVALID = ""  # a generation that names no tag
VIEWS = ("listed", "calibrated", "all")


def view_predictions(summed: np.ndarray, lengths: Sequence[int], listed: list[list[int]],
                     view: str, prior: np.ndarray | None = None) -> np.ndarray:
    """The predicted tag index per row of `summed` [N, K] (each tag's summed log-probability)
    in `view`; `lengths` [K] are the tags' token counts, `listed` each row's candidate tag
    indices, `prior` [N, K] the no-profile condition's `summed` (the calibrated view). Ties go
    to the first candidate listed."""
    if view == "all":
        return summed.argmax(1)
    mean = summed / np.asarray(lengths, dtype=np.float64)
    if view == "calibrated":
        if prior is None:
            raise ValueError("the calibrated view needs the no-profile prior")
        mean = mean - prior / np.asarray(lengths, dtype=np.float64)
    elif view != "listed":
        raise ValueError(f"unknown view {view!r}")
    return np.array([row[int(np.argmax(mean[i, row]))] for i, row in enumerate(listed)])


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
    """Whether a text mentions any tag as a word."""
    said = f" {_norm(text)} "
    return any(f" {_norm(t)} " in said for t in tags)


def _within_genre_leak(counts: np.ndarray) -> np.ndarray:
    """Per resample, from counts [..., 4, G] (gold named, gold listed, other named, other
    listed per genre): Σ_g w_g (rate named as gold − rate named as another candidate), over
    the genres seen both ways, w_g ∝ how often g is the gold."""
    gold_named, gold_n, other_named, other_n = (counts[..., k, :] for k in range(4))
    both = (gold_n > 0) & (other_n > 0)
    gap = np.where(both, gold_named / np.maximum(gold_n, 1)
                   - other_named / np.maximum(other_n, 1), 0.0)
    weight = np.where(both, gold_n, 0.0)
    return (gap * weight).sum(-1) / np.maximum(weight.sum(-1), 1)


def leak_figures(texts: list[str], golds: list[str], listed: list[tuple[str, ...]]
                 ) -> dict[str, float]:
    """The label-leak checks of neutral generations when the question lists the candidates.

    A neutral text may name the movie's genres (the question lists them); it leaks the label
    only if it singles out the gold. Two figures, each with a 95% bootstrap interval over
    texts (questions with a single candidate are left out):
    - `leak`: the share of texts naming the gold minus the mean share of the other listed
      candidates they name. It also counts a genre prior: a genre that is often the gold and
      that the model names often anyway (Drama) raises it with no information on the user;
    - `leak_within_genre`: per genre, how often a text names it when it is the gold minus
      when it is listed but not the gold, averaged over genres weighted by how often each is
      the gold. The genre's own naming rate cancels: this is what the gate uses.
    """
    genres = sorted({c for options in listed for c in options})
    code = {g: i for i, g in enumerate(genres)}
    gold_named, other_named, counts = [], [], []
    for text, gold, options in zip(texts, golds, listed, strict=True):
        others = [c for c in options if c != gold]
        if not others:
            continue
        named = {c: names_a_tag(text, (c,)) for c in options}
        gold_named.append(float(named[gold]))
        other_named.append(float(np.mean([named[c] for c in others])))
        row = np.zeros((4, len(genres)))
        row[0, code[gold]], row[1, code[gold]] = named[gold], 1
        for c in others:
            row[2, code[c]] += named[c]
            row[3, code[c]] += 1
        counts.append(row)
    if not gold_named:
        return {"leak_texts": 0}
    diff = np.array(gold_named) - np.array(other_named)
    low, high = bootstrap_interval(diff, resamples=2000, seed=0)
    table = np.stack(counts)  # [n, 4, G]
    index = resamples(len(table), 2000, seed=0)
    within = _within_genre_leak(table[index].sum(1))
    return {"leak_texts": len(diff), "names_gold_share": float(np.mean(gold_named)),
            "names_other_candidate_share": float(np.mean(other_named)),
            "leak": float(diff.mean()), "leak_lo": low, "leak_hi": high,
            "leak_within_genre": float(_within_genre_leak(table.sum(0))),
            "leak_within_genre_lo": float(np.percentile(within, 2.5)),
            "leak_within_genre_hi": float(np.percentile(within, 97.5))}


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


def correct_of(gold: list[str], pred: list[str]) -> np.ndarray:
    return np.array([g == p for g, p in zip(gold, pred, strict=True)], dtype=np.float64)


def bootstrap_ci(gold: list[str], pred: list[str], tags: tuple[str, ...], resamples_: int,
                 seed: int) -> dict[str, float]:
    """Accuracy and macro-F1 with 95% percentile bootstrap intervals over the questions."""
    correct = correct_of(gold, pred)
    low, high = bootstrap_interval(correct, resamples=resamples_, seed=seed)
    f1s = macro_f1_resampled(gold, pred, tags, resamples(len(gold), resamples_, seed))
    return {"accuracy": float(correct.mean()), "accuracy_lo": low, "accuracy_hi": high,
            "macro_f1": macro_f1(gold, pred, tags),
            "macro_f1_lo": float(np.percentile(f1s, 2.5)),
            "macro_f1_hi": float(np.percentile(f1s, 97.5))}


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, resamples_: int,
                      seed: int) -> dict[str, float]:
    """Accuracy of a minus b on the same questions (b may be a mean over null draws): the
    difference and its 95% interval, resampling questions (paired)."""
    diff = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    low, high = bootstrap_interval(diff, resamples=resamples_, seed=seed)
    return {"diff": float(diff.mean()), "lo": low, "hi": high}


def null_distribution(gold: list[str], edit: list[str], nulls: list[list[str]],
                      tags: tuple[str, ...], resamples_: int, seed: int, view: str
                      ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The edit's predictions against null draws' on the same questions, as metrics of
    `view`: the draws' accuracy (mean, sd, min, max) and macro-F1 (mean, sd), the edit's on
    these questions, its rank and p among the draws (p = (1 + #{null >= edit}) / (1 + N)),
    and edit minus the draws' mean with its paired 95% interval. Also each draw's accuracy and
    macro-F1 (the second value)."""
    edit_correct = correct_of(gold, edit)
    draws = np.stack([correct_of(gold, p) for p in nulls])  # [N, n]
    accuracies = draws.mean(1).tolist()
    f1s = [macro_f1(gold, p, tags) for p in nulls]
    spread, f1_spread = mean_sd(accuracies), mean_sd(f1s)
    rank = null_rank_p(float(edit_correct.mean()), accuracies)
    diff = paired_difference(edit_correct, draws.mean(0), resamples_, seed)
    figures = {f"null_{view}_accuracy_mean": spread["mean"],
               f"null_{view}_accuracy_sd": spread["sd"],
               f"null_{view}_accuracy_min": min(accuracies),
               f"null_{view}_accuracy_max": max(accuracies),
               f"null_{view}_macro_f1_mean": f1_spread["mean"],
               f"null_{view}_macro_f1_sd": f1_spread["sd"],
               f"edit_subset_{view}_accuracy": float(edit_correct.mean()),
               f"edit_subset_{view}_macro_f1": macro_f1(gold, edit, tags),
               f"edit_null_rank_{view}": rank["rank"], f"edit_null_p_{view}": rank["p"],
               **{f"edit_minus_null_{view}_{k}": v for k, v in diff.items()}}
    return figures, {"accuracy": accuracies, "macro_f1": f1s}


def entropy(logprobs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the distribution over tags that the tags' log-probabilities give."""
    z = logprobs - logprobs.max(1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return -(prob * np.log(np.clip(prob, 1e-300, None))).sum(1)
