"""The passkey positive control: the generator, the probe's chance level and scoring, train-lm's
passkey sequences, the sliding-window control, and eval-memory end to end."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import assert_one_line_error

from newllm.core.errors import NewllmError
from newllm.core.stats import wilson_interval
from newllm.infini.models import create_model
from newllm.infini.passkey import (
    DIGITS,
    PasskeyTask,
    PasskeyTokens,
    passkey_probe,
    passkey_task,
    training_sequences,
)


@pytest.fixture(scope="module")
def tiny_tokens(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model), PasskeyTokens.build(
        AutoTokenizer.from_pretrained(tiny_model), 0, 32)


def test_the_generator_puts_the_key_and_the_question_where_it_says(tiny_tokens):
    _, t = tiny_tokens
    task = PasskeyTask(segment_length=32, segments=8)
    filler = t.filler[:32]
    for key, distance in ((3, 0), (7, 2), (0, 6)):
        ids = task.sequence(t, key, distance, 257)
        assert len(ids) == 257 and ids[0] == 0  # a sequence starts at a separator
        at = 1 + len(t.opening) + len(t.lead)
        assert ids[at] == t.digits[key]  # the key, in segment 0
        for s in range(1, distance + 1):  # then filler segments only
            assert ids[s * 32:(s + 1) * 32] == filler
        q = (distance + 1) * 32
        assert ids[q:q + len(t.question)] == t.question  # the question opens its segment
        answer = task.answer_position(t, distance)
        assert ids[answer] == t.digits[key]
        # digits occur only as the key, repeated in segment 0, and as the answer
        found = [i for i, x in enumerate(ids) if x in t.digits]
        assert found[-1] == answer and found[0] == at and max(found[:-1]) < 32
        assert len(found) - 1 == (32 - 1 - len(t.opening) - len(t.closing)) // 2
        assert {ids[i] for i in found} == {t.digits[key]}
    rows, answers = training_sequences(task, t, 200, 257, random.Random(0))
    assert rows.shape == (200, 257)
    found = {(int(rows[i, 1 + len(t.opening) + len(t.lead)]), int(a)) for i, a in
             enumerate(answers)}
    assert {t.digits.index(k) for k, _ in found} == set(range(DIGITS))  # every key drawn
    assert {task.answer_position(t, d) for d in range(7)} == {a for _, a in found}
    assert all(rows[i, a] == rows[i, 1 + len(t.opening) + len(t.lead)]
               for i, a in enumerate(answers.tolist()))


class DigitReader(torch.nn.Module):
    """A stand-in model: after reading a chunk it predicts the last digit it has seen, in this
    chunk only (`carry=False`: a model without memory) or since reset_memory (a working
    memory); without a digit, its fixed preference 0 > 1 > ... > 9."""

    def __init__(self, digits: list[int], vocab: int, carry: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.digits, self.vocab, self.carry = digits, vocab, carry
        self.seen: list[int | None] = []

    def reset_memory(self) -> None:
        self.seen = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.seen or not self.carry:
            self.seen = [None] * len(ids)
        logits = torch.zeros(len(ids), ids.shape[1], self.vocab)
        for b, row in enumerate(ids.tolist()):
            for x in row:
                if x in self.digits:
                    self.seen[b] = self.digits.index(x)
            for rank, d in enumerate(self.digits):
                logits[b, -1, d] = -rank
            if self.seen[b] is not None:
                logits[b, -1, self.digits[self.seen[b]]] = 10.0
        return logits

    def full_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("candidates", [2, 5, 10])
def test_a_key_blind_model_scores_chance_and_a_memory_scores_every_trial(tiny_tokens,
                                                                         candidates):
    tokenizer, t = tiny_tokens
    task = PasskeyTask(32, 8)
    trials = 400
    blind = passkey_probe(DigitReader(t.digits, len(tokenizer), carry=False), 32, task, t,
                          [0, 3], trials, candidates, seed=0)
    for result in blind:  # 1 / candidates, within a 99 % interval of 400 trials
        lo, hi = wilson_interval(result.correct, trials, level=0.99)
        assert lo < 1 / candidates < hi, (candidates, result)
    memory = passkey_probe(DigitReader(t.digits, len(tokenizer), carry=True), 32, task, t,
                           [0, 3, 12], 50, candidates, seed=0)
    assert [r.accuracy for r in memory] == [1.0, 1.0, 1.0]
    # a window as long as the whole sequence sees the key without any memory
    window = passkey_probe(DigitReader(t.digits, len(tokenizer), carry=False), 4096, task, t,
                           [0, 3], 50, candidates, seed=0)
    assert [r.accuracy for r in window] == [1.0, 1.0]
    lo, hi = memory[0].interval()
    assert lo < 1.0 and hi == 1.0


def test_the_probe_refuses_impossible_candidate_counts(tiny_tokens):
    tokenizer, t = tiny_tokens
    model = DigitReader(t.digits, len(tokenizer), carry=True)
    with pytest.raises(NewllmError, match="between 2 and 10"):
        passkey_probe(model, 32, PasskeyTask(32, 8), t, [0], 5, 11, seed=0)


def test_the_task_must_fit_its_segments(tiny_tokens):
    tokenizer, _ = tiny_tokens
    with pytest.raises(NewllmError, match="not a whole number of passkey segments"):
        passkey_task(100, 32)
    small = PasskeyTokens.build(tokenizer, 0, 16)
    with pytest.raises(NewllmError, match="more than a task segment of 16"):
        PasskeyTask(16, 4).sequence(small, 1, 0, 64)


def test_the_real_tokenizer_writes_each_key_as_one_token_after_a_shared_lead(real_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_assets / "smollm2-135m")
    t = PasskeyTokens.build(tokenizer, 0, 32)
    assert tokenizer.convert_ids_to_tokens(t.lead) == ["Ġ"]
    assert tokenizer.convert_ids_to_tokens(t.digits) == [str(d) for d in range(10)]
    ids = PasskeyTask(32, 8).sequence(t, 4, 1, 257)
    assert tokenizer.decode(ids[1:32]) == "The pass key is" + " 4" * 11 + ". Remember it. The"
    assert tokenizer.decode(ids[64:96]).startswith("What is the pass key? The pass key is 4.")


def test_the_sliding_window_reads_pythia_as_its_segments_when_the_stride_is_the_context():
    from newllm.core.base import BaseInfo
    from newllm.core.ppl import evaluate_ppl
    from newllm.infini.training import SegmentScorer, WindowScorer

    torch.manual_seed(0)
    model = create_model("pythia", vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                         max_length=8).eval()
    # whole windows only (a last partial window would take more context than its segment)
    docs = [torch.randint(1, 50, (n,)) for n in (24, 8, 32)]
    texts = ["a b c"] * 3
    info = BaseInfo("tiny", "0" * 64, "0" * 64, "tiny")
    segments = evaluate_ppl(SegmentScorer(model, 8, torch.device("cpu"), info, 0, "s"), docs,
                            texts, 0, 8, 8, 1)
    window = WindowScorer(model, torch.device("cpu"), info, 0, "s", 8)
    same = evaluate_ppl(window, docs, texts, 0, 8, 8, 4)
    assert math.isclose(same.nll, segments.nll, rel_tol=1e-6) and same.tokens == segments.tokens
    sliding = evaluate_ppl(window, docs, texts, 0, 8, 2, 4)  # more context per token
    assert sliding.tokens == segments.tokens and sliding.nll != pytest.approx(segments.nll)
    with pytest.raises(NewllmError, match="carries memory between segments"):
        WindowScorer(create_model("infini", vocab_size=50, d_model=16, n_layers=2, n_heads=2,
                                  d_ff=32, max_length=8), torch.device("cpu"), info, 0, "s", 8)


TINY_LM = ("--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32",
           "--shortlist", "128", "--segment-length", "16", "--segments-per-sequence", "8",
           "--max-train-tokens", "2048", "--val-max-tokens", "200", "--batch-size", "4",
           "--reversal-facts", "null", "--passkey-monitor-trials", "10")


def test_train_lm_trains_on_passkey_sequences_and_eval_memory_probes_its_task(
        run_cli, tiny_model, prepared_tiny, tmp_path):
    common = ("--model", str(tiny_model), "--device", "cpu")
    result = run_cli("train-lm", *common, "--kind", "infini", "--data", str(prepared_tiny),
                     *TINY_LM, "--out", "lm/model.safetensors", "--metrics", "train.json",
                     "--plot", "train.csv", "--epochs", "2", cwd=tmp_path)
    assert result.code == 0, result.err
    train = json.loads((tmp_path / "train.json").read_text())
    # 16 sequences of 4 task segments of 32 (model segments of 16), half of them passkey
    # ones; the text stream fills the other half (the last text token starts no sequence)
    assert train["train_sequences"] == 15 and train["passkey_sequences"] == 8
    assert train["memory_gradient"] == "sequence" and train["memory_grad_k_init"] > 0
    assert {"passkey_d1_epoch2", "passkey_d2_epoch2", "val_ppl_last_change"} <= set(train)
    header = (tmp_path / "train.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,val_loss,val_ppl,passkey_d1,passkey_d2"

    result = run_cli("eval-memory", *common, "--checkpoint", "lm/model.safetensors",
                     "--data", str(prepared_tiny), "--max-compressions", "4", "--targets", "2",
                     "--passkey-fillers", "[0, 2, 5]", "--passkey-trials", "20",
                     "--passkey-candidates", "4", "--metrics", "mem.json", "--plot",
                     "mem.csv", "--passkey-plot", "pk.csv", cwd=tmp_path)
    assert result.code == 0, result.err
    mem = json.loads((tmp_path / "mem.json").read_text())
    assert mem["passkey_segment_length"] == 32 and mem["passkey_segments"] == 4
    assert mem["passkey_chance"] == 0.25 and mem["passkey_trials"] == 20
    for d in (0, 2, 5):
        assert mem[f"passkey_after_{d}_lo"] <= mem[f"passkey_after_{d}"] \
            <= mem[f"passkey_after_{d}_hi"]
        assert (mem[f"passkey_after_{d}"] * 20) % 1 == 0
    rows = (tmp_path / "pk.csv").read_text().splitlines()
    assert rows[0] == "distance,accuracy,lo,hi,chance" and len(rows) == 4

    # pythia: its sliding-window val PPL beside the segment reading
    result = run_cli("train-lm", *common, "--kind", "pythia", "--data", str(prepared_tiny),
                     *TINY_LM, "--out", "py/model.safetensors", "--metrics", "py.json",
                     "--plot", "py.csv", cwd=tmp_path)
    assert result.code == 0, result.err
    py = json.loads((tmp_path / "py.json").read_text())
    assert py["window_context_length"] == 16 and py["window_stride"] == 8
    assert py["val_ppl_window"] > 0 and py["val_ppl_window"] != py["val_ppl"]
    assert py["memory_gradient"] is None and "memory_grad_k_init" not in py


def test_train_lm_refuses_a_sequence_that_is_not_whole_passkey_segments(run_cli, tiny_model,
                                                                         prepared_tiny,
                                                                         tmp_path):
    result = run_cli("train-lm", "--model", str(tiny_model), "--data", str(prepared_tiny),
                     *TINY_LM, "--passkey-segment-length", "24", "--out", "lm/model.safetensors",
                     "--metrics", "train.json", "--plot", "train.csv", cwd=tmp_path)
    assert result.code == 2
    assert_one_line_error(result, "train_lm.passkey_segment_length", "128 tokens")
    assert not (tmp_path / "lm").exists() and not (tmp_path / "train.json").exists()
