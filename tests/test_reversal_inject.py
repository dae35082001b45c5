"""inject-facts: the fictitious fact sets, the fine-tuning loss, the early stop, the
two-sample bootstrap, and the stage on the tiny model (a positive control: trained facts
must become answerable forward)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error
from transformers import AutoModelForCausalLM

from newllm.core.reversal import DEFAULT_TEMPLATES, SHIPPED_PAIRS, read_pairs
from newllm.core.stats import bootstrap_difference
from newllm.core.train import TrainConfig, Trainer
from newllm.evaluation.injection import SETS, lm_loss, make_fact_sets, training_sentences


def test_fact_sets_are_disjoint_and_their_distractors_stay_in_set_and_relation():
    real = read_pairs(SHIPPED_PAIRS, "csv")
    sets = make_fact_sets(10, seed=0, exclude=real, templates=DEFAULT_TEMPLATES, distractors=3)
    names = {name: {n for p in sets.pairs[name] for n in (p.child, p.parent)} for name in SETS}
    assert all(len(sets.pairs[name]) == 10 for name in SETS)
    assert not (names["forward_only"] & names["both"] or names["both"] & names["unseen"]
                or names["forward_only"] & names["unseen"])
    for name in SETS:
        by_type = {t: {p.parent for p in sets.pairs[name] if p.parent_type == t}
                   for t in ("father", "mother")}
        assert len(by_type["father"]) == len(by_type["mother"]) == 5
        for pair, ahead, back in zip(sets.pairs[name], sets.forward[name], sets.backward[name],
                                     strict=True):
            assert ahead.prompt == f"{pair.child}'s {pair.parent_type} is"
            assert ahead.answer == pair.parent and back.answer == pair.child
            assert back.prompt == f"{pair.parent}'s child is"
            assert set(ahead.distractors) <= by_type[pair.parent_type] - {pair.parent}
            assert set(back.distractors) <= {p.child for p in sets.pairs[name]
                                             if p.parent_type == pair.parent_type} - {pair.child}
    texts = training_sentences(sets, DEFAULT_TEMPLATES)
    assert len(texts) == 30
    assert not any(p.child in t or p.parent in t for p in sets.pairs["unseen"] for t in texts)
    backward_seen = [t for t in texts if "'s child is" in t]
    assert len(backward_seen) == 10  # the backward sentences of `both`, and only those
    assert all(any(t.startswith(p.parent) for p in sets.pairs["both"]) for t in backward_seen)


def test_lm_loss_is_the_mean_next_token_loss_after_the_separator(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = [[5, 9, 13, 7], [11, 4], [8, 8, 20]]
    rows = torch.tensor([0, 1])
    got = lm_loss(model, rows, ids, separator_id=0, device=torch.device("cpu"))
    total, count = 0.0, 0
    for i in rows.tolist():  # each sentence alone, unpadded
        x = torch.tensor([[0, *ids[i]]])
        logits = model(input_ids=x).logits[0, :-1]
        total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids[i])
    assert math.isclose(float(got), total / count, rel_tol=1e-5)


def test_trainer_stop_ends_training_after_the_epoch_it_says():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    model = torch.nn.Linear(3, 1)
    asked: list[int] = []

    def stop(_: torch.nn.Module, epoch) -> bool:
        asked.append(epoch.epoch)
        return epoch.epoch == 3

    trainer = Trainer(TrainConfig("t", epochs=10, batch_size=8, lr=0.01, schedule="constant"))
    history = trainer.fit(model, lambda m, rows: F.mse_loss(m(x[rows]), y[rows]), 32,
                          torch.Generator().manual_seed(0), stop=stop)
    assert [e.epoch for e in history] == asked == [1, 2, 3]
    assert len(trainer.fit(model, lambda m, rows: F.mse_loss(m(x[rows]), y[rows]), 32,
                           torch.Generator().manual_seed(0))) == 10  # no stop: every epoch


def test_bootstrap_difference_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, 500), rng.normal(0.0, 1.0, 400)
    diff, lo, hi = bootstrap_difference(a, b, resamples=4000, seed=0)
    assert math.isclose(diff, a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert math.isclose(lo, diff - 1.96 * se, abs_tol=0.15 * se)
    assert math.isclose(hi, diff + 1.96 * se, abs_tol=0.15 * se)
    assert bootstrap_difference(a, b, seed=3) == bootstrap_difference(a, b, seed=3)
    with pytest.raises(ValueError):
        bootstrap_difference([], b)


INJECT_TINY = ("--facts-per-set", "6", "--distractors", "2", "--lr", "0.01", "--batch-size",
               "2", "--score-batch-size", "64", "--check-from-epoch", "1",
               "--train-embeddings", "true", "--device", "cpu")


def test_inject_facts_on_the_tiny_model_learns_the_trained_facts(run_cli, tiny_model,
                                                                  tmp_path):
    result = run_cli("inject-facts", "--model", str(tiny_model), *INJECT_TINY,
                     "--max-epochs", "60", "--metrics", "m.json", "--plot", "p.csv",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    m = json.loads((tmp_path / "m.json").read_text())
    curve = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [int(r["epoch"]) for r in curve] == list(range(m["epochs"] + 1))
    assert m["training_sentences"] == 6 + 12 and m["chance_rank_accuracy"] == 1 / 3
    # positive control: fine-tuning on the facts makes them answerable forward, and the
    # stop fired when the forward-only facts first reached the target (the last curve row)
    assert m["target_reached"] and m["epochs"] < 60
    assert float(curve[-1]["forward_only_forward_rank_accuracy"]) >= 0.9
    assert all(float(r["forward_only_forward_rank_accuracy"]) < 0.9 for r in curve[:-1])
    assert m["forward_only__forward_rank_accuracy"] >= 0.9
    assert m["both__backward_rank_accuracy"] >= 4 / 6  # seen backward, learned backward
    for name in SETS:
        for d in ("forward", "backward"):
            assert m[f"{name}__{d}_rank_accuracy_lo"] <= m[f"{name}__{d}_rank_accuracy"] \
                <= m[f"{name}__{d}_rank_accuracy_hi"]
    assert m["both__backward_logprob_gain_lo"] > 0  # above the never-trained facts
    assert m["both__backward_answer_margin_lo"] > 0  # above its distractors

    # a target of 0 stops after the first epoch
    assert run_cli("inject-facts", "--model", str(tiny_model), *INJECT_TINY,
                   "--target-accuracy", "0", "--metrics", "m0.json", "--plot", "p0.csv",
                   cwd=tmp_path).code == 0
    assert json.loads((tmp_path / "m0.json").read_text())["epochs"] == 1


def test_inject_facts_bad_exclude_file_is_one_line(run_cli, tiny_model, tmp_path):
    result = run_cli("inject-facts", "--model", str(tiny_model), "--exclude-pairs", "no.csv",
                     "--metrics", "m.json", "--plot", "p.csv", cwd=tmp_path)
    assert_one_line_error(result, "inject_facts.exclude_pairs 'no.csv' does not exist")
    assert not (tmp_path / "m.json").exists()
    result = run_cli("inject-facts", "--model", str(tiny_model), "--facts-per-set", "4",
                     "--distractors", "3", "--metrics", "m.json", "--plot", "p.csv",
                     cwd=tmp_path)
    assert_one_line_error(result, "inject_facts.distractors (3) needs at least 4 distinct")
    assert not (tmp_path / "m.json").exists()
