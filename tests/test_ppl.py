"""Sliding-window perplexity against independent straightforward computations."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from newllm.base import load_base
from newllm.data import count_bytes, count_words
from newllm.ppl import (
    HFScorer,
    build_stream,
    evaluate_ppl,
    naive_sliding_window_nll,
    separator_token_id,
    window_spans,
)

TEXTS = [
    "The river flows through the old city and reaches the sea.",
    "Bread is made from flour, water, salt and yeast.",
    "Birds migrate south in autumn and return north in spring, when days grow longer.",
    "A language model assigns a probability to every sequence of words.",
    "The committee voted to build a new bridge across the harbour.",
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    # float64 so the comparisons test the windowing, not float32 rounding
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval().double()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    base = load_base(str(tiny_model), device="cpu")
    base.model.double()
    scorer = HFScorer.from_base(base)
    return model, scorer, docs, separator_token_id(tokenizer)


def reference_window_loop(model, stream, mask, context_length, stride):
    """Independent: for each target t, the window that scores it, one target at a time."""
    n = len(stream)
    # Which window scores target t: the first window covers targets 1..C, then blocks of stride.
    nll, count = 0.0, 0
    for t in range(1, n):
        if not mask[t]:
            continue
        k = 0 if t <= context_length else math.ceil((t - context_length) / stride)
        window_last = min(context_length + k * stride, n - 1)
        begin = max(0, window_last - context_length)
        with torch.no_grad():
            logits = model(stream[begin:window_last][None]).logits[0]
        nll -= torch.log_softmax(logits[t - 1 - begin].double(), -1)[stream[t]].item()
        count += 1
    return nll, count


@pytest.mark.parametrize("n,context,stride", [(10, 4, 4), (10, 4, 1), (11, 4, 3), (50, 16, 5),
                                              (5, 16, 8), (33, 8, 8), (2, 4, 2)])
def test_window_spans_score_every_target_exactly_once(n, context, stride):
    seen = []
    for begin, end, n_scored in window_spans(n, context, stride):
        assert 0 < end - begin <= context
        assert 1 <= n_scored <= end - begin
        seen += list(range(end + 1 - n_scored, end + 1))
        # each scored target has at least context - stride tokens of context (or all before it)
        first = end + 1 - n_scored
        assert first - begin >= min(first, context - stride + 1) or first - begin == first
    assert seen == list(range(1, n))


def test_single_window_equals_one_forward_pass(tiny):
    model, scorer, docs, sep = tiny
    stream, mask = build_stream(docs, sep)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(stream[None]).logits[0].double(), -1)
    targets = torch.arange(1, len(stream))
    token_nll = -log_probs[targets - 1, stream[targets]]
    expected_nll = token_nll[mask[1:]].sum().item()
    result = evaluate_ppl(scorer, docs, TEXTS, sep, context_length=len(stream), stride=7,
                          batch_size=3)
    assert result.tokens == int(mask.sum()) == sum(len(d) for d in docs)
    assert result.token_ppl == pytest.approx(math.exp(expected_nll / result.tokens), abs=1e-4)
    words = sum(count_words(t) for t in TEXTS)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert result.words == words and result.bytes == n_bytes == sum(count_bytes(t) for t in TEXTS)
    assert result.word_ppl == pytest.approx(math.exp(expected_nll / words), abs=1e-4)
    assert result.bits_per_byte == pytest.approx(expected_nll / n_bytes / math.log(2), abs=1e-6)


@pytest.mark.parametrize("context,stride,batch_size", [
    (16, 16, 4),   # stride = context: non-overlapping windows
    (16, 5, 3),    # overlap, final short window
    (32, 8, 8),
    (24, 24, 1),
    (40, 13, 2),
])
def test_batched_matches_plain_window_loop(tiny, context, stride, batch_size):
    model, scorer, docs, sep = tiny
    stream, mask = build_stream(docs, sep)
    assert len(stream) > 2 * context  # several windows
    expected_nll, expected_count = reference_window_loop(model, stream, mask, context, stride)
    result = evaluate_ppl(scorer, docs, TEXTS, sep, context, stride, batch_size)
    assert result.tokens == expected_count
    assert result.token_ppl == pytest.approx(math.exp(expected_nll / expected_count), abs=1e-4)
    naive_nll, naive_count, _ = naive_sliding_window_nll(scorer, stream, mask, context, stride)
    assert naive_count == expected_count
    assert naive_nll == pytest.approx(expected_nll, abs=1e-3)


def test_stride_changes_result_but_context_limits_it(tiny):
    """Longer context (smaller stride) must change the NLL: the test can tell windows apart."""
    _, scorer, docs, sep = tiny
    short = evaluate_ppl(scorer, docs, TEXTS, sep, 8, 8, 4)
    overlap = evaluate_ppl(scorer, docs, TEXTS, sep, 8, 2, 4)
    assert short.tokens == overlap.tokens
    assert short.nll != pytest.approx(overlap.nll, abs=1e-6)


def test_non_finite_logits_stop_with_a_clear_error(tiny):
    from newllm.errors import NewllmError

    _, scorer, docs, sep = tiny

    class NanScorer:
        device, info, separator_id = scorer.device, scorer.info, sep

        def logits(self, input_ids, keep):
            return torch.full((*input_ids.shape[:1], keep, 400), float("nan"))

    with pytest.raises(NewllmError, match="non-finite loss"):
        evaluate_ppl(NanScorer(), docs, TEXTS, sep, 16, 8, 2)
