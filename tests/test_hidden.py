"""hidden_states_at: HF's hidden_states convention, early stop, layer range; decoder-layer
indices; left padding (core/tokens.py)."""

from __future__ import annotations

import pytest
import torch

from newllm.core.base import load_base
from newllm.core.errors import NewllmError
from newllm.core.hidden import hidden_states_at, resolve_decoder_layers, resolve_layer_index
from newllm.core.tokens import left_pad


@pytest.fixture(scope="module")
def tiny_base(tiny_model):
    return load_base(str(tiny_model), device="cpu")


@pytest.mark.parametrize("layer_index", [0, 1, 2, -1, -2, -3])
def test_matches_hf_hidden_states_with_padding(tiny_base, layer_index):
    model = tiny_base.model
    ids = torch.tensor([[5, 6, 7, 8, 9], [2, 2, 30, 31, 32]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask,
                         output_hidden_states=True).hidden_states[layer_index]
        got = hidden_states_at(model, ids, mask, layer_index)
    assert got.shape == (2, 5, 32)
    # compare real positions only: padded ones are garbage either way
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)


def test_stops_at_the_layer_and_never_runs_the_head(tiny_base):
    model = tiny_base.model
    called = []
    modules = {"layer0": model.model.layers[0], "layer1": model.model.layers[1],
               "norm": model.model.norm, "lm_head": model.lm_head}
    handles = [m.register_forward_hook(lambda *_, n=n: called.append(n))
               for n, m in modules.items()]
    try:
        with torch.no_grad():
            hidden_states_at(model, torch.tensor([[1, 40]]), None, 1)
        assert called == ["layer0"]
        called.clear()
        with torch.no_grad():
            hidden_states_at(model, torch.tensor([[1, 40]]), None, -1)
        assert called == ["layer0", "layer1", "norm"]
    finally:
        for handle in handles:
            handle.remove()
    # the stopping hook is gone: a normal forward pass still runs to the end
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 40]])).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("layer_index", [3, -4, 100])
def test_out_of_range_names_the_key_and_the_range(layer_index):
    with pytest.raises(NewllmError, match=r"extract_pairs\.hidden_index must be in \[-3, 2\]"):
        resolve_layer_index(layer_index, 2, "extract_pairs.hidden_index")


def test_negative_indices_count_from_the_end():
    assert [resolve_layer_index(i, 30) for i in (-1, -31, 0, 30, 15)] == [30, 0, 0, 30, 15]


def test_decoder_layers_are_sorted_distinct_and_zero_is_the_first_decoder_layer():
    # a decoder index, unlike a hidden-states index: 0 is the first decoder layer, -1 the last
    assert resolve_decoder_layers([-1, -2], 30, "k") == [28, 29]
    assert resolve_decoder_layers([5, -25, 0], 30, "k") == [0, 5]
    assert resolve_decoder_layers([], 30, "k") == []
    for bad in (30, -31):
        with pytest.raises(NewllmError, match=r"^train_compressor\.attn_decoder_layers must "
                                              r"hold decoder layer indices in \[-30, 29\] .*"
                                              rf"got {bad}\.$"):
            resolve_decoder_layers([1, bad], 30, "train_compressor.attn_decoder_layers")


def test_left_pad_ids_and_embeddings():
    ids, mask, positions = left_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and mask.dtype == torch.int64
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    rows = [torch.arange(6.0).reshape(3, 2), torch.tensor([[9.0, 9.5]])]
    embeds, mask, positions = left_pad(rows, torch.tensor([-1.0, -2.0]))
    assert embeds.tolist() == [[[0, 1], [2, 3], [4, 5]], [[-1, -2], [-1, -2], [9, 9.5]]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
