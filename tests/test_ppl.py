"""Sliding-window perplexity against independent straightforward computations."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from newllm.core.base import load_base
from newllm.core.data import count_bytes, count_words
from newllm.core.ppl import (
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
                          batch_size=3, documents="stream")
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
    result = evaluate_ppl(scorer, docs, TEXTS, sep, context, stride, batch_size, "stream")
    assert result.tokens == expected_count
    assert result.token_ppl == pytest.approx(math.exp(expected_nll / expected_count), abs=1e-4)
    naive_nll, naive_count, _ = naive_sliding_window_nll(scorer, stream, mask, context, stride)
    assert naive_count == expected_count
    assert naive_nll == pytest.approx(expected_nll, abs=1e-3)


def test_stride_changes_result_but_context_limits_it(tiny):
    """Longer context (smaller stride) must change the NLL: the test can tell windows apart."""
    _, scorer, docs, sep = tiny
    short = evaluate_ppl(scorer, docs, TEXTS, sep, 8, 8, 4, "stream")
    overlap = evaluate_ppl(scorer, docs, TEXTS, sep, 8, 2, 4, "stream")
    assert short.tokens == overlap.tokens
    assert short.nll != pytest.approx(overlap.nll, abs=1e-6)


def test_non_finite_logits_stop_with_a_clear_error(tiny):
    from newllm.core.errors import NewllmError

    _, scorer, docs, sep = tiny

    class NanScorer:
        device, info, separator_id, max_length = scorer.device, scorer.info, sep, None

        def logits(self, input_ids, keep):
            return torch.full((*input_ids.shape[:1], keep, 400), float("nan"))

    with pytest.raises(NewllmError, match="non-finite loss"):
        evaluate_ppl(NanScorer(), docs, TEXTS, sep, 16, 8, 2)


def lm_eval_rolling_nll(model, docs, prefix_token, context_length, stride):
    """lm-evaluation-harness's loglikelihood_rolling, window by window, with its own window
    maker: rolling windows of `context_length` predicting `stride` new tokens, made disjoint
    and scored as HFLM scores a (context, continuation) request."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    nll, count = 0.0, 0
    for doc in docs:
        windows = get_rolling_token_windows(doc.tolist(), prefix_token, context_length,
                                            context_length - stride + 1)
        for context, continuation in map(make_disjoint_window, windows):
            inputs = (context + continuation)[-(context_length + 1):][:-1]
            with torch.no_grad():
                logits = model(torch.tensor([inputs])).logits[0, -len(continuation):]
            log_probs = torch.log_softmax(logits.double(), -1)
            nll -= log_probs[torch.arange(len(continuation)), continuation].sum().item()
            count += len(continuation)
    return nll, count


@pytest.mark.parametrize("context,stride,batch_size", [(8, 8, 2), (8, 3, 4), (16, 5, 1),
                                                       (64, 32, 4)])
def test_separate_documents_match_lm_eval_rolling_windows(tiny, context, stride, batch_size):
    model, scorer, docs, sep = tiny
    assert max(len(d) for d in docs) > context or context == 64  # several windows per doc
    expected_nll, expected_count = lm_eval_rolling_nll(model, docs, sep, context, stride)
    result = evaluate_ppl(scorer, docs, TEXTS, sep, context, stride, batch_size, "separate")
    assert result.tokens == expected_count == sum(len(d) for d in docs)
    assert result.nll == pytest.approx(expected_nll, abs=1e-6)
    naive = evaluate_ppl(scorer, docs, TEXTS, sep, context, stride, batch_size, "separate",
                         naive=True)
    assert naive.nll == pytest.approx(expected_nll, abs=1e-6)


def test_separate_does_not_depend_on_document_order_but_stream_does(tiny):
    _, scorer, docs, sep = tiny
    order = [3, 0, 4, 2, 1]
    shuffled, texts = [docs[i] for i in order], [TEXTS[i] for i in order]
    separate = evaluate_ppl(scorer, docs, TEXTS, sep, 32, 16, 4, "separate")
    assert evaluate_ppl(scorer, shuffled, texts, sep, 32, 16, 4, "separate").nll == \
        pytest.approx(separate.nll, abs=1e-9)
    stream = evaluate_ppl(scorer, docs, TEXTS, sep, 32, 16, 4, "stream")
    assert evaluate_ppl(scorer, shuffled, texts, sep, 32, 16, 4, "stream").nll != \
        pytest.approx(stream.nll, abs=1e-6)


@pytest.mark.parametrize("lengths,context,stride,batch_size", [
    ([5000], 512, 64, 8),             # one long stream: the first window must stand alone
    ([40, 700, 3, 90, 512, 513], 64, 16, 4),
    ([30] * 50, 512, 256, 4),         # short documents share batches
])
def test_window_batches_bound_logits_and_cover_every_window(lengths, context, stride,
                                                            batch_size):
    from newllm.core.ppl import Window, window_batches

    windows = [Window(i, b, e, n) for i, n_tokens in enumerate(lengths)
               for b, e, n in window_spans(n_tokens, context, stride)]
    batches = window_batches(windows, batch_size, context, stride)
    assert sorted(w for batch in batches for w in batch) == sorted(windows)
    for batch in batches:
        length = max(w.length for w in batch)
        keep = length - min(w.length - w.scored for w in batch)
        if len(batch) > 1:  # a lone window may exceed the budget: it has to be scored
            assert len(batch) * keep <= batch_size * stride
            assert len(batch) * length <= batch_size * context
    if lengths == [5000]:  # the first window scores 512 = batch_size x stride positions
        assert [len(b) for b in batches if any(w.begin == 0 for w in b)] == [1]
        assert all(len(b) == batch_size for b in batches[1:-1])
    if lengths == [30] * 50:
        assert len(batches) < 50 // 2  # several short documents per forward pass


def test_context_longer_than_the_model_reads_is_a_clear_error(tiny):
    from newllm.core.errors import NewllmError

    _, scorer, docs, sep = tiny
    assert scorer.max_length == 512
    with pytest.raises(NewllmError, match=r"context_length \(1024\) exceeds the model's "
                                          r"max_position_embeddings \(512\)"):
        evaluate_ppl(scorer, docs, TEXTS, sep, 1024, 512, 2)


class FakeTokenizer:
    def __init__(self, vocab, bos=None, eos=None):
        self.vocab, self.bos_token_id, self.eos_token_id = vocab, bos, eos

    def get_vocab(self):
        return self.vocab


def test_separator_prefers_the_document_boundary_over_chat_markers():
    from newllm.core.errors import NewllmError
    from newllm.core.tokens import separator_token_id

    chat = FakeTokenizer({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3},
                         bos=1, eos=2)  # SmolLM2-Instruct's layout
    assert separator_token_id(chat) == 0
    assert separator_token_id(chat, "<|im_end|>") == 2
    assert separator_token_id(FakeTokenizer({"<s>": 1, "</s>": 2}, bos=1, eos=2)) == 1
    assert separator_token_id(FakeTokenizer({"</s>": 0}, eos=0)) == 0
    with pytest.raises(NewllmError, match=r"base\.separator_token '<eos>' is not a token"):
        separator_token_id(chat, "<eos>")
    with pytest.raises(NewllmError, match="no document-boundary, BOS or EOS"):
        separator_token_id(FakeTokenizer({"a": 0}))


def test_hf_fast_path_equals_the_plain_logits_path(tiny):
    from newllm.core.ppl import nll_from_logits

    _, scorer, _, _ = tiny
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, 300, (3, 20), generator=generator)
    labels = torch.randint(3, 300, (3, 12), generator=generator)
    labels[0, :5] = -100  # unscored context and padding
    labels[2, 9:] = -100
    fast = scorer.summed_nll(inputs, 12, labels)
    assert fast.item() == pytest.approx(nll_from_logits(scorer, inputs, 12, labels).item(),
                                        abs=1e-9)
    labels[1, 3] = (labels[1, 3] + 1) % 300  # and it does depend on every scored label
    assert scorer.summed_nll(inputs, 12, labels).item() != pytest.approx(fast.item(), abs=1e-9)


class WholeStreamScorer:
    """A recurrent-style kind over the tiny model: reads each stream in one forward pass."""

    def __init__(self, scorer: HFScorer):
        self.inner = scorer
        self.device, self.info = scorer.device, scorer.info
        self.separator_id, self.separator_token = scorer.separator_id, scorer.separator_token
        self.max_length = None
        self.calls = 0

    def logits(self, input_ids, keep):
        raise AssertionError("a kind with stream_nll is never windowed")

    def stream_nll(self, ids, mask):
        self.calls += 1
        logits = self.inner.model(input_ids=ids[None]).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
        return float(nll[mask[1:]].sum())


@pytest.mark.parametrize("documents", ["separate", "stream"])
def test_recurrent_kind_reads_whole_streams_and_counts_like_the_windows(tiny, documents):
    _, scorer, docs, sep = tiny
    recurrent = WholeStreamScorer(scorer)
    result = evaluate_ppl(recurrent, docs, TEXTS, sep, 8, 4, 2, documents)
    # one window as long as the whole stream reads exactly what the recurrence reads
    longest = sum(len(d) + 1 for d in docs)
    windowed = evaluate_ppl(scorer, docs, TEXTS, sep, longest, longest, 1, documents)
    assert recurrent.calls == (len(docs) if documents == "separate" else 1)
    assert (result.windows, result.context_length, result.stride) == (0, None, None)
    assert result.tokens == windowed.tokens == sum(len(d) for d in docs)
    assert result.nll == pytest.approx(windowed.nll, rel=1e-7)
    assert result.word_ppl == pytest.approx(windowed.word_ppl, rel=1e-6)
