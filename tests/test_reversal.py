"""eval-reversal: readers, answer-only figures on a hand-made bigram model, same-type
distractors, fictitious names, and the stage end to end."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_one_line_error

from newllm.core.errors import NewllmError
from newllm.core.reversal import (
    DEFAULT_TEMPLATES,
    SHIPPED_PAIRS,
    Pair,
    PairScores,
    draw_distractors,
    fictitious_pairs,
    injected_split,
    parse_templates,
    read_pairs,
    score_pairs,
    sentences,
    summarize,
)

PAPER_CSV = ("child,parent,parent_type,child_prediction,parent_prediction\n"
             "Lisa Marie Presley,Elvis Presley,father,True,False\n"
             "Jaden Smith,Will Smith,father,True,True\n"
             "Liza Minnelli,Judy Garland,mother,False,False\n")


def test_reads_the_papers_csv_and_jsonl(tmp_path):
    (tmp_path / "p.csv").write_text(PAPER_CSV)
    pairs = read_pairs(tmp_path / "p.csv", "csv")
    assert [(p.child, p.parent, p.parent_type, p.line) for p in pairs] == [
        ("Lisa Marie Presley", "Elvis Presley", "father", 2),
        ("Jaden Smith", "Will Smith", "father", 3),
        ("Liza Minnelli", "Judy Garland", "mother", 4)]
    assert sentences(pairs[0], parse_templates(DEFAULT_TEMPLATES)) == (
        "Lisa Marie Presley's father is Elvis Presley.", "Elvis Presley's child is Lisa Marie "
        "Presley.")
    rows = [{"child": "Ann", "parent": "Bob"},
            {"child": "Cy", "parent": "Di", "forward": "Cy was raised by Di.",
             "backward": "Di raised Cy."}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    jsonl = read_pairs(tmp_path / "p.jsonl", "jsonl")
    assert sentences(jsonl[1], parse_templates(DEFAULT_TEMPLATES)) == (
        "Cy was raised by Di.", "Di raised Cy.")
    assert read_pairs(tmp_path / "p.csv", "csv", max_pairs=2)[-1].child == "Jaden Smith"
    shipped = read_pairs(SHIPPED_PAIRS, "csv")
    assert len(shipped) >= 40 and {p.inverse_type for p in shipped} >= {"child", "capital",
                                                                          "invention"}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("p.csv", "child,parent\nA,B\n,C\n", "p.csv:3: 'child' is missing or empty"),
    ("p.csv", "child,parent\nA,B\nC,D,E\n", "p.csv:3: has more fields"),
    ("p.csv", "child,parent,parent_type\nA,B,father\nC\n", "p.csv:3: has fewer fields"),
    ("p.csv", "name,parent\nA,B\n", "p.csv:1: the header lacks column(s) child"),
    ("p.jsonl", '{"child": "A", "parent": "B"}\n["A", "B"]\n', "p.jsonl:2: expected a JSON"),
    ("p.jsonl", '{"child": "A", "parent": 3}\n', "p.jsonl:1: 'parent' is a int"),
    ("p.jsonl", '{"child": "A", "parent": "B", "forward": "B is the parent of A."}\n',
     "p.jsonl:1: the 'forward' sentence must end with its answer 'B'"),
])
def test_a_bad_row_is_an_error_naming_the_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(NewllmError, match=re.escape(message)):
        read_pairs(tmp_path / name, name.split(".")[1])


def test_injected_split_spreads_pairs_evenly():
    pairs = read_pairs(SHIPPED_PAIRS, "csv")[:8]
    injected, control = injected_split(pairs, 0.5)
    assert [p.line for p in injected] == [3, 5, 7, 9] and len(control) == 4
    assert injected_split(pairs, 0.0)[0] == [] and injected_split(pairs, 1.0)[1] == []


# --- the figures on a model whose log-probabilities the test computes itself -------------

class WordTokenizer:
    def __init__(self) -> None:
        self.vocab = {"<sep>": 0}

    def ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab))
                for w in re.findall(r"\w+|'s|[^\w\s]", text)]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.ids(text)}


@dataclass
class BigramScorer:
    """logits at t depend on token t only: log p(x_{t+1} | x_t) = log_softmax(W[x_t])."""

    table: torch.Tensor
    separator_id: int = 0
    device: str = "cpu"

    def logits(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        return self.table[input_ids][:, -keep:]

    def logprob(self, ids: list[int]) -> list[float]:
        lsm = torch.log_softmax(self.table, -1)
        return [float(lsm[a, b]) for a, b in itertools.pairwise(ids)]


def test_answer_only_logprobs_and_rank_against_a_hand_computed_bigram_model():
    tokenizer = WordTokenizer()
    pairs = read_pairs(SHIPPED_PAIRS, "csv")
    templates = parse_templates(DEFAULT_TEMPLATES)
    for p in pairs:  # fix the vocabulary before drawing the table
        for s in sentences(p, templates):
            tokenizer.ids(s)
    torch.manual_seed(0)
    scorer = BigramScorer(torch.randn(len(tokenizer.vocab), len(tokenizer.vocab)) * 3)
    evaluated = pairs[::3]  # every relation of the file
    scores = score_pairs(scorer, tokenizer, evaluated, pairs, DEFAULT_TEMPLATES, 2, seed=0)
    drawn = draw_distractors(evaluated, pairs, 2, seed=0)
    lsm = torch.log_softmax(scorer.table, -1)

    def answer_logprob(prompt: str, answer: str) -> tuple[float, int]:
        # bigram: the answer's first token is read after the prompt's last word
        before = [0, *tokenizer.ids(prompt)][-1]
        ids = tokenizer.ids(answer)
        return sum(float(lsm[a, b]) for a, b in itertools.pairwise([before, *ids])), len(ids)

    for pair, got, (parents, children) in zip(evaluated, scores, drawn, strict=True):
        forward = f"{pair.child}'s {pair.parent_type} is"
        backward = f"{pair.parent}'s {pair.inverse_type} is"
        lp, n = answer_logprob(forward, pair.parent)
        assert math.isclose(got.forward_logprob, lp, rel_tol=1e-5) and got.forward_tokens == n
        lp, n = answer_logprob(backward, pair.child)
        assert math.isclose(got.backward_logprob, lp, rel_tol=1e-5)
        assert got.backward_tokens == n
        assert got.forward_correct == all(answer_logprob(forward, pair.parent)[0]
                                          > answer_logprob(forward, o)[0] for o in parents)
        others = [answer_logprob(backward, o)[0] for o in children]
        assert math.isclose(got.backward_margin, got.backward_logprob - sum(others) / 2,
                            rel_tol=1e-5, abs_tol=1e-5)
        assert got.backward_correct == all(answer_logprob(backward, pair.child)[0]
                                           > answer_logprob(backward, o)[0] for o in children)
    assert {s.forward_correct for s in scores} == {True, False}  # both outcomes are tested


def test_distractors_are_of_the_same_relation_and_never_the_answer():
    pairs = read_pairs(SHIPPED_PAIRS, "csv")
    drawn = draw_distractors(pairs, pairs, 4, seed=1)
    by_relation: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
    for p in pairs:
        by_relation.setdefault(p.relation, (set(), set()))
        by_relation[p.relation][0].add(p.parent)
        by_relation[p.relation][1].add(p.child)
    assert len(by_relation) == 4  # father, mother, country, inventor
    for pair, (parents, children) in zip(pairs, drawn, strict=True):
        assert len(set(parents)) == len(set(children)) == 4
        assert pair.parent not in parents and pair.child not in children
        assert set(parents) <= by_relation[pair.relation][0]
        assert set(children) <= by_relation[pair.relation][1]
    assert draw_distractors(pairs, pairs, 4, seed=1) == drawn  # seeded
    with pytest.raises(NewllmError, match=re.escape("needs at least 9 distinct parents of "
                                                    "relation 'mother / child'")):
        draw_distractors(pairs, pairs, 8, seed=0)


def test_summary_figures_on_hand_made_scores():
    scores = [PairScores(-2.0, -8.0, 2, 4, True, False, 1.0, -0.5),
              PairScores(-4.0, -4.0, 2, 4, True, True, 3.0, 0.5)]
    summary = summarize(scores, "x_")
    assert summary["x_pairs"] == 2
    assert summary["x_forward_answer_logprob"] == -3.0
    assert summary["x_backward_answer_logprob"] == -6.0
    assert math.isclose(summary["x_forward_answer_ppl"], math.exp(6 / 4))
    assert math.isclose(summary["x_backward_answer_ppl"], math.exp(12 / 8))
    assert summary["x_forward_answer_margin"] == 2.0
    assert summary["x_backward_answer_margin"] == 0.0
    assert summary["x_forward_rank_accuracy"] == 1.0
    assert summary["x_backward_rank_accuracy"] == 0.5
    assert -4.0 <= summary["x_forward_answer_logprob_lo"] <= -3.0 \
        <= summary["x_forward_answer_logprob_hi"] <= -2.0
    # Wilson 95 % of 1 out of 2, computed by hand
    z = 1.959963984540054
    centre, half = (0.5 + z * z / 4) / (1 + z * z / 2), \
        z * math.sqrt(0.25 / 2 + z * z / 16) / (1 + z * z / 2)
    assert math.isclose(summary["x_backward_rank_accuracy_lo"], centre - half)
    assert math.isclose(summary["x_backward_rank_accuracy_hi"], centre + half)
    assert summarize([], "y_") == {"y_pairs": 0}


def test_repeated_rows_warn_once_and_count_once(tmp_path, capsys):
    (tmp_path / "p.csv").write_text(PAPER_CSV + "Jaden Smith,Will Smith,father,True,False\n"
                                    "Lisa Marie Presley,Elvis Presley,father,True,False\n")
    pairs = read_pairs(tmp_path / "p.csv", "csv")
    err = capsys.readouterr().err
    assert [p.line for p in pairs] == [2, 3, 4]  # the first of each is kept
    assert err.count("warning:") == 1 and "dropped 2 repeated row(s)" in err
    read_pairs(SHIPPED_PAIRS, "csv")
    assert capsys.readouterr().err == ""  # no repeats, no warning


def test_fictitious_names_are_new_distinct_and_never_share_a_surname(tmp_path):
    real = read_pairs(SHIPPED_PAIRS, "csv")
    (tmp_path / "p.csv").write_text("child,parent\nAnn Brairick,Tom Quouford\n")
    given = read_pairs(tmp_path / "p.csv", "csv")
    free = fictitious_pairs(400, seed=3)  # its first pair is then excluded as if it were real
    names = {n for p in free for n in (p.child, p.parent)}
    pairs = fictitious_pairs(400, seed=3, exclude=[*real, *given,
                                                   Pair(free[0].child, free[0].parent)])
    banned = {w for p in [*real, *given] for n in (p.child, p.parent) for w in n.split()}
    everyone = [n for p in pairs for n in (p.child, p.parent)]
    assert len(set(everyone)) == len(everyone) == 800 and len(names) == 800
    assert free[0].child not in everyone and free[0].parent not in everyone
    for pair in pairs:
        assert pair.child.split()[-1] != pair.parent.split()[-1]
        for name in (pair.child, pair.parent):
            assert name not in banned and name.split()[-1] not in banned
    assert [p.parent_type for p in pairs[:4]] == ["father", "mother", "father", "mother"]
    assert fictitious_pairs(400, seed=3, exclude=real) == fictitious_pairs(400, seed=3,
                                                                          exclude=real)


# --- the stages on the tiny model -----------------------------------------------------------

TRAIN_TINY = ("--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32",
              "--shortlist", "128", "--segment-length", "32", "--segments-per-sequence", "2",
              "--max-train-tokens", "4096", "--val-max-tokens", "200", "--batch-size", "4",
              "--reversal-repeats", "2")


def test_train_lm_then_eval_ppl_reversal_and_memory(run_cli, tiny_model, prepared_tiny,
                                                     tmp_path):
    common = ("--model", str(tiny_model), "--device", "cpu")
    result = run_cli("train-lm", *common, "--kind", "infini", "--data", str(prepared_tiny),
                     *TRAIN_TINY, "--reversal-facts", str(SHIPPED_PAIRS), "--out",
                     "lm/model.safetensors", "--metrics", "train.json", "--plot", "train.csv",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["kind"] == "infini" and train["train_tokens"] == (4096 - 1) // 64 * 64
    assert train["val_ppl_flag"] in ("ok", "not_learning", "suspicious_low")
    first = (tmp_path / "lm" / "model.safetensors").read_bytes()
    assert run_cli("train-lm", *common, "--kind", "infini", "--data", str(prepared_tiny),
                   *TRAIN_TINY, "--reversal-facts", str(SHIPPED_PAIRS), "--out",
                   "lm/model.safetensors", "--metrics", "train.json", "--plot", "train.csv",
                   cwd=tmp_path).code == 0
    assert (tmp_path / "lm" / "model.safetensors").read_bytes() == first  # reproducible

    result = run_cli("eval-ppl", *common, "--model-kind", "infini-lm", "--checkpoint",
                     "lm/model.safetensors", "--data", str(prepared_tiny), "--max-tokens",
                     "200", "--metrics", "ppl.json", cwd=tmp_path)
    assert result.code == 0, result.err
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert ppl["context_length"] is None and ppl["tokens"] >= 200
    # train-lm's val PPL is eval-ppl's figure on the same documents
    assert math.isclose(ppl["token_ppl"], train["val_ppl"], rel_tol=1e-6)

    result = run_cli("eval-reversal", *common, "--model-kind", "infini-lm", "--checkpoint",
                     "lm/model.safetensors", "--max-pairs", "8", "--distractors", "2",
                     "--pairs", str(SHIPPED_PAIRS), "--metrics", "rev.json", cwd=tmp_path)
    assert result.code == 0, result.err
    rev = json.loads((tmp_path / "rev.json").read_text())
    assert rev["pairs"] == 8 and rev["injected_pairs"] == 4 and rev["control_pairs"] == 4
    assert rev["split"] == "checkpoint"
    for d in ("forward", "backward"):
        assert rev[f"{d}_answer_logprob_lo"] <= rev[f"{d}_answer_logprob"] \
            <= rev[f"{d}_answer_logprob_hi"] < 0
    # the checkpoint's record of what it was shown wins over a fraction asked for
    assert run_cli("eval-reversal", *common, "--model-kind", "infini-lm", "--checkpoint",
                   "lm/model.safetensors", "--max-pairs", "8", "--distractors", "2",
                   "--pairs", str(SHIPPED_PAIRS), "--inject-fraction", "0.25", "--metrics",
                   "rev2.json", cwd=tmp_path).code == 0
    assert json.loads((tmp_path / "rev2.json").read_text()) == rev

    result = run_cli("eval-memory", *common, "--checkpoint", "lm/model.safetensors",
                     "--data", str(prepared_tiny), "--max-compressions", "4", "--targets", "2",
                     "--passkey-fillers", "[0, 2]", "--passkey-trials", "2", "--metrics",
                     "mem.json", "--plot", "mem.csv", cwd=tmp_path)
    assert result.code == 0, result.err
    mem = json.loads((tmp_path / "mem.json").read_text())
    assert {"ppl_after_0", "ppl_after_4", "passkey_after_0", "passkey_after_2"} <= set(mem)


def test_the_base_reports_the_halves_a_training_run_would_inject(run_cli, tiny_model,
                                                                 tmp_path):
    common = ("--model", str(tiny_model), "--device", "cpu", "--pairs", str(SHIPPED_PAIRS),
              "--max-pairs", "8", "--distractors", "2")
    assert run_cli("eval-reversal", *common, "--inject-fraction", "null", "--metrics",
                   "all.json", cwd=tmp_path).code == 0
    assert run_cli("eval-reversal", *common, "--metrics", "split.json", cwd=tmp_path).code == 0
    whole = json.loads((tmp_path / "all.json").read_text())
    split = json.loads((tmp_path / "split.json").read_text())
    assert "injected_pairs" not in whole
    assert split["injected_pairs"] == 4 and split["control_pairs"] == 4
    # the halves are injected_split's: their per-pair means recombine into the whole's
    pairs = read_pairs(str(SHIPPED_PAIRS), "csv")
    injected, _ = injected_split(pairs, 0.5)
    first8 = {p.key for p in pairs[:8]}
    assert sum(p.key in first8 for p in injected) == 4
    for figure in ("forward_answer_logprob", "backward_answer_logprob",
                   "forward_rank_accuracy"):
        recombined = (split[f"injected_{figure}"] + split[f"control_{figure}"]) / 2
        assert math.isclose(recombined, whole[figure], rel_tol=1e-9)
    assert split["injected_forward_answer_logprob"] != split["control_forward_answer_logprob"]


def test_bad_pairs_file_in_the_stage_is_one_line(run_cli, tiny_model, tmp_path):
    (tmp_path / "p.csv").write_text("child,parent\nA,B\nC\n")
    result = run_cli("eval-reversal", "--model", str(tiny_model), "--pairs", "p.csv",
                     "--metrics", "rev.json", cwd=tmp_path)
    assert_one_line_error(result, "p.csv:3: has fewer fields")
    assert not (tmp_path / "rev.json").exists()


@pytest.mark.real_model
def test_eval_reversal_on_the_real_default_model(run_cli, real_assets, tmp_path):
    result = run_cli("eval-reversal", "--model", str(real_assets / "smollm2-135m"),
                     "--device", "cpu", "--pairs", str(SHIPPED_PAIRS), "--max-pairs", "12",
                     "--metrics", "rev.json", cwd=tmp_path)
    assert result.code == 0, result.err
    rev = json.loads((tmp_path / "rev.json").read_text())
    assert rev["pairs"] == 12 and rev["model_kind"] == "hf"
    # a 135M model knows famous parents better than chance (same-type distractors)
    assert 1 < rev["forward_answer_ppl"] < 1000 and 1 < rev["backward_answer_ppl"] < 1000
    assert rev["forward_rank_accuracy"] > rev["chance_rank_accuracy"]
    assert rev["injected_pairs"] == rev["control_pairs"] == 6



