"""CVFP (issue 19): diversity objectives under the norm, fixed-point fidelity, the shortlist
training head, phase 2's context controls, the grid's seeds and comparisons, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from newllm.core.train import TrainConfig
from newllm.cvfp.grid import choose_diversity, compare_rows
from newllm.cvfp.model import CVFPLM, CVFPConfig
from newllm.cvfp.phase1 import (
    Phase1Config,
    diversity_loss,
    effective_rank,
    fixed_point_fidelity,
    isotropy_gap,
    lipschitz_estimate,
    shifted,
    train_block,
)
from newllm.cvfp.phase2 import (
    ShortlistHead,
    control_contexts,
    evaluate,
    shortlist_ids,
    train_token_block,
)
from newllm.cvfp.recurrence import block_contexts, stream_contexts


def normalized(rows: torch.Tensor) -> torch.Tensor:
    """What the context norm leaves, exactly (no eps): zero mean, norm sqrt(d) per row."""
    rows = rows.double() - rows.double().mean(dim=1, keepdim=True)
    return rows / rows.pow(2).mean(dim=1, keepdim=True).sqrt()


def mean_zero_batches(d: int = 32, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalized batches, both with mean exactly 0: rank 1 (+v, -v) and near-isotropic."""
    generator = torch.Generator().manual_seed(0)
    v = normalized(torch.randn(1, d, generator=generator))
    line = torch.cat([v.expand(n // 2, d), -v.expand(n // 2, d)])  # norm(-v) = -norm(v)
    spread = normalized(torch.randn(n // 2, d, generator=generator))
    cloud = torch.cat([spread, -spread])
    return line, cloud


def test_under_the_norm_the_seeds_objectives_see_only_the_batch_mean():
    line, cloud = mean_zero_batches()
    assert effective_rank(line)[0] < 1.01 < 10 < effective_rank(cloud)[0]
    for kind in ("oacd", "dispersion"):  # ||X - mu||^2 = n (d - ||mu||^2): same loss
        assert float(diversity_loss(line, kind, 0.1)) == pytest.approx(
            float(diversity_loss(cloud, kind, 0.1)), abs=1e-9)
    # the new objective tells them apart: the rank-1 batch is far from isotropic
    gap = float(diversity_loss(line, "decorrelation", 0.1)) - float(
        diversity_loss(cloud, "decorrelation", 0.1))
    assert gap > 0.5


def test_isotropy_gap_against_numpy():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(4)).double()
    a = x.numpy()
    c = np.cov(a, rowvar=False, bias=True)
    participation = np.trace(c) ** 2 / (c ** 2).sum()
    assert float(isotropy_gap(x)) == pytest.approx(1 / participation - 1 / 6, rel=1e-9)
    line = torch.outer(torch.randn(40, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    assert float(isotropy_gap(line)) == pytest.approx(1 - 1 / 6, rel=1e-9)


def test_prenorm_objective_reads_what_the_norm_erased():
    """States that differ by a per-row scale and shift have the same normalized rows (same
    OACD) but not the same spread before the norm."""
    states = torch.randn(40, 8, generator=torch.Generator().manual_seed(5)).double()
    scales = torch.linspace(0.5, 3.0, 40, dtype=torch.float64)[:, None]
    other = states * scales + 2.0
    assert torch.allclose(normalized(states), normalized(other), atol=1e-12)
    assert float(diversity_loss(normalized(states), "oacd", 0.1)) == pytest.approx(
        float(diversity_loss(normalized(other), "oacd", 0.1)), abs=1e-12)
    a = float(diversity_loss(normalized(states), "oacd_prenorm", 0.1, states))
    b = float(diversity_loss(normalized(other), "oacd_prenorm", 0.1, other))
    assert abs(a - b) > 0.1
    expected = -np.linalg.norm(other.numpy() - other.numpy().mean(0)) / 40 + 0.1 * (
        other.numpy().mean(0) ** 2).sum()
    assert b == pytest.approx(expected, rel=1e-9)


def test_fidelity_against_numpy():
    p, x = torch.randn(20, 5), torch.randn(20, 5)
    mse, relative = fixed_point_fidelity(p, x)
    assert mse == pytest.approx(float(((p - x) ** 2).mean()), rel=1e-6)
    assert relative == pytest.approx(float(np.linalg.norm(p - x) / np.linalg.norm(x)), rel=1e-6)
    assert fixed_point_fidelity(x, x) == (0.0, 0.0)


def contraction_block(embed: int = 12, dim: int = 6):
    """A normalized block whose update barely reads c: W_c = 0 and W_e large, so the state
    before the norm is dominated by ReLU(W_e e + b) and the map is a contraction in c."""
    torch.manual_seed(0)
    model = CVFPLM(CVFPConfig(50, embed, 1, 1, 1, dim), torch.randn(50, embed))
    layer = model.context_blocks[0].layers[0]
    with torch.no_grad():
        layer.linear.weight[:, :dim] = 0.0
        layer.linear.weight[:, dim:] *= 100.0
        layer.linear.bias.fill_(500.0)  # keep the ReLU open for every row
    return model.context_blocks[0]


def test_fidelity_is_zero_when_a_planted_contraction_is_iterated_to_convergence():
    block = contraction_block()
    embeddings = torch.randn(120, 12, generator=torch.Generator().manual_seed(1))
    states = torch.randn(16, 6)
    top, _ = lipschitz_estimate(lambda c: block(c, embeddings[:16]), states,
                                torch.Generator().manual_seed(0))
    assert top < 0.2  # a planted contraction
    config = Phase1Config(max_iterations=12, lr=1e-30, init="noise", convergence_target=2.0,
                          lipschitz_samples=4, batch_size=40)
    records, last = train_block(block, embeddings, embeddings[:20], config,
                                torch.Generator().manual_seed(2))
    assert records[1]["fidelity_relative"] > 1e-3  # the measure can see a gap
    assert records[-1]["fidelity_relative"] < 1e-6
    assert records[-1]["fidelity_mse"] < 1e-10
    assert torch.allclose(last, block_contexts(block, embeddings, block.initial_context),
                          atol=1e-5)


def test_fidelity_of_a_non_contraction_stays_positive_after_few_iterations():
    """The same measure on a block that reads its context strongly: after 3 parallel
    iterations from noise only the first positions are exact (the rest is not)."""
    torch.manual_seed(0)
    model = CVFPLM(CVFPConfig(50, 12, 1, 1, 1, 6), torch.randn(50, 12))
    block = model.context_blocks[0]
    with torch.no_grad():
        block.layers[0].linear.weight[:, :6] *= 20.0
    embeddings = torch.randn(60, 12, generator=torch.Generator().manual_seed(3))
    records, last = train_block(block, embeddings, embeddings[:10],
                                Phase1Config(max_iterations=3, lr=1e-30, init="noise",
                                             convergence_target=2.0, lipschitz_samples=4),
                                torch.Generator().manual_seed(2))
    exact = block_contexts(block, embeddings, block.initial_context)
    assert records[-1]["fidelity_relative"] == pytest.approx(
        fixed_point_fidelity(last, exact)[1], rel=1e-6)
    assert records[-1]["fidelity_relative"] > 1e-2
    assert torch.allclose(last[:3], exact[:3], atol=1e-5)  # iteration k: k positions exact
    assert torch.equal(shifted(last, block.initial_context)[1:], last[:-1])


def test_shortlist_ids_and_head_against_a_hand_softmax():
    ids = torch.tensor([5, 3, 3, 1, 1, 3, 0, 2, 2, 9])  # targets (from 1 on): 3 x3, 1 x2, 2 x2
    assert shortlist_ids(ids, 3, 10).tolist() == [3, 1, 2]  # ties by id
    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    head = ShortlistHead(torch.tensor([3, 1, 2]), weight)
    others = [0, 4, 5, 6, 7, 8, 9]
    assert torch.allclose(head.other.detach(), weight[others].mean(0))
    assert float(head.other_bias) == pytest.approx(math.log(7))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([3, 9, 2, 0, 1])
    a, w = x.double().numpy(), weight.double().numpy()
    logits = np.concatenate([a @ w[[3, 1, 2]].T, (a @ w[others].mean(0) + math.log(7))[:, None]],
                            axis=1)
    classes = [0, 3, 2, 3, 1]
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -log_probs[np.arange(5), classes].mean()
    assert float(head.loss(x, weight, targets)) == pytest.approx(expected, rel=1e-5)


def test_control_contexts():
    contexts = torch.arange(30.0).reshape(10, 1, 3)
    assert torch.equal(control_contexts(contexts, "cvfp"), contexts)
    assert torch.equal(control_contexts(contexts, "zeros"), torch.zeros(10, 1, 3))
    shuffled = control_contexts(contexts, "shuffled", seed=3)
    order = (shuffled[:, 0, 0] / 3).long()
    assert sorted(order.tolist()) == list(range(10))  # the same rows, each elsewhere
    assert all(order[i] != i for i in range(10))
    assert torch.equal(shuffled, control_contexts(contexts, "shuffled", seed=3))


def copy_two_back_stream(vocab: int, segments: int, seed: int) -> torch.Tensor:
    """Segments A B A B A B of random A, B: inside a segment the next token is the token two
    back, which the current token alone does not give."""
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, vocab, (segments, 2), generator=generator)
    return pairs.repeat(1, 3).reshape(-1)


def test_real_contexts_beat_zeros_when_the_next_token_depends_on_two_tokens():
    vocab, embed = 8, 12
    torch.manual_seed(0)
    embeddings = torch.randn(vocab, embed)
    train_ids, val_ids = copy_two_back_stream(vocab, 300, 0), copy_two_back_stream(vocab, 60, 1)
    figures = {}
    for mode in ("cvfp", "zeros"):
        torch.manual_seed(1)
        model = CVFPLM(CVFPConfig(vocab, embed, 1, 1, 1, 16), embeddings)
        train = (control_contexts(stream_contexts(model, train_ids, chunk_tokens=512), mode),
                 train_ids)
        val = (control_contexts(stream_contexts(model, val_ids, chunk_tokens=512), mode),
               val_ids)
        history = train_token_block(model, train, val, vocab + 1,
                                    TrainConfig("phase2_token", 15, 32, 3e-2),
                                    torch.Generator().manual_seed(0), val_every_epoch=False)
        figures[mode] = history[-1]
    assert figures["zeros"].val_loss > 0.9 * math.log(vocab)  # e_t alone cannot know B
    assert figures["zeros"].val_accuracy < 0.2
    # untrained contexts already carry the token two back (measured: 0.35 vs 0.07 accuracy;
    # the loss gap is smaller because the tied head's gain starts at 0.1)
    assert figures["cvfp"].val_loss < figures["zeros"].val_loss - 0.15
    assert figures["cvfp"].val_accuracy > figures["zeros"].val_accuracy + 0.2


def test_shortlist_training_learns_under_the_full_head():
    vocab, embed = 40, 12
    torch.manual_seed(0)
    model = CVFPLM(CVFPConfig(vocab, embed, 1, 1, 1, 8), torch.randn(vocab, embed))
    ids = torch.arange(10).repeat(40)  # ten frequent tokens, predictable
    contexts = stream_contexts(model, ids, chunk_tokens=128)
    before, _, _ = evaluate(model, contexts, ids, vocab - 1, torch.device("cpu"))
    history = train_token_block(model, (contexts, ids), (contexts, ids), vocab - 1,
                                TrainConfig("phase2_token", 20, 32, 1e-2),
                                torch.Generator().manual_seed(0), shortlist=12)
    assert history[-1].val_loss < 0.5 * before  # figures with the full 40-token head
    assert all(e.val_ppl is not None for e in history)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.token_block.parameters())  # the head is not kept


def row(val_ppl: float, sd: float, diversity: str = "oacd") -> dict:
    return {"val_ppl": val_ppl, "val_ppl_sd": sd, "diversity": diversity}


def test_compare_rows_marks_differences_beyond_two_sd():
    rows = {"blocks2_500": row(100.0, 2.0), "c1t1_500": row(103.0, 1.0),
            "c2t2_500": row(90.0, 3.0), "diversity_decorrelation": row(95.0, 2.0,
                                                                       "decorrelation")}
    out = compare_rows(rows)
    assert out["c1t1_500"] == {"difference": 3.0, "threshold": 4.0, "differs": False}
    assert out["c2t2_500"]["differs"] and out["c2t2_500"]["threshold"] == 6.0
    assert out["diversity_decorrelation"]["differs"]
    assert choose_diversity(rows) == "decorrelation"  # c2t2_500 is no objective row
    rows["diversity_decorrelation"]["val_ppl"] = 101.0
    assert choose_diversity(rows) == "oacd"


def test_grid_summary_bad_input(tmp_path, run_cli):
    folder = tmp_path / "grid"
    folder.mkdir()
    args = ("cvfp-grid-summary", "--metrics-dir", str(folder), "--metrics",
            str(tmp_path / "s.json"), "--plots", str(tmp_path / "s.csv"))
    (folder / "inherit.json").write_text(json.dumps({"inherit__val_ppl": 1.0}))
    result = run_cli(*args, cwd=tmp_path)
    assert_one_line_error(result, "blocks2_500.json does not exist",
                          "run cvfp-grid --config blocks2_500 first")
    (folder / "blocks2_500.json").write_text(json.dumps({"blocks2_500__val_ppl": 1.0}))
    result = run_cli(*args, cwd=tmp_path)
    assert_one_line_error(result, "no blocks2_500__val_ppl_sd", "re-run cvfp-grid")
    assert not (tmp_path / "s.json").exists()


def test_grid_summary_compares_the_rows_it_finds(tmp_path, run_cli):
    folder = tmp_path / "grid"
    folder.mkdir()
    for name, ppl, sd, kind in (("blocks2_500", 100.0, 1.0, "oacd"),
                                ("inherit", 101.0, 1.0, "oacd"),
                                ("diversity_decorrelation", 90.0, 2.0, "decorrelation")):
        (folder / f"{name}.json").write_text(json.dumps(
            {f"{name}__val_ppl": ppl, f"{name}__val_ppl_sd": sd, f"{name}__diversity": kind,
             f"{name}__val_accuracy": 0.1, f"{name}__val_accuracy_sd": 0.01}))
    result = run_cli("cvfp-grid-summary", "--metrics-dir", str(folder), "--metrics",
                     str(tmp_path / "s.json"), "--plots", str(tmp_path / "s.csv"), cwd=tmp_path)
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["rule_picks_diversity"] == "decorrelation"
    assert summary["inherit__differs_from_default"] is False
    assert summary["diversity_decorrelation__differs_from_default"] is True
    assert summary["inherit__vs_default"].startswith("+1.0 (within 2 sd")


def test_phase2_controls_bad_input(tmp_path, run_cli):
    result = run_cli("phase2-token", "--controls", "[zeros, nope]", cwd=tmp_path)
    assert_one_line_error(result, "phase2_token.controls must be distinct values of")
    result = run_cli("phase2-token", "--seeds", "[]", cwd=tmp_path)
    assert_one_line_error(result, "phase2_token.seeds is empty")
    result = run_cli("cvfp-grid", "--seeds", "[]", "--metrics-dir", "m", "--plots-dir", "p",
                     "--runs-dir", "r", cwd=tmp_path)
    assert_one_line_error(result, "cvfp_grid.seeds is empty")
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == []
