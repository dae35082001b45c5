"""Infini-attention memory math, the factory, memory state transfer, and train-lm's pieces."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from newllm.core.errors import NewllmError
from newllm.infini.memory import (
    MemoryAttention,
    MemoryConfig,
    alibi_slopes,
    retrieve,
    sigma,
    update,
)
from newllm.infini.models import STATE_KEYS, count_parameters, create_model

TINY = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_length=8)


def test_retrieval_after_one_key_value_returns_that_value():
    torch.manual_seed(0)
    k, v, q = torch.randn(1, 4), torch.randn(1, 3), torch.randn(5, 4)  # one token stored
    memory, norm = update(sigma(k), v, torch.zeros(4, 3), torch.zeros(4), delta_rule=False)
    # M = σ(k)ᵀv, z = σ(k): σ(q)M / σ(q)z = (σ(q)·σ(k)) v / (σ(q)·σ(k)) = v for every query
    assert torch.allclose(memory, sigma(k).T @ v) and torch.allclose(norm, sigma(k)[0])
    assert torch.allclose(retrieve(sigma(q), memory, norm), v.expand(5, 3), atol=1e-6)
    # an empty memory retrieves zeros, not NaN
    assert torch.equal(retrieve(sigma(q), torch.zeros(4, 3), torch.zeros(4)), torch.zeros(5, 3))


def test_delta_rule_stores_only_what_memory_lacks():
    torch.manual_seed(1)
    k, v = torch.randn(1, 4), torch.randn(1, 3)
    m1, z1 = update(sigma(k), v, torch.zeros(4, 3), torch.zeros(4), delta_rule=True)
    m2, z2 = update(sigma(k), v, m1, z1, delta_rule=True)
    # the memory already retrieves v for k: the delta V − σ(K)M/(σ(K)z) is 0, M is unchanged
    assert torch.allclose(m2, m1, atol=1e-6) and torch.allclose(z2, 2 * z1)
    m_lin, z_lin = update(sigma(k), v, m1, z1, delta_rule=False)
    assert torch.allclose(m_lin, 2 * m1) and torch.allclose(z_lin, 2 * z1)
    # a new value under the same key: the delta rule moves the read-out towards it
    v_new = torch.randn(1, 3)
    m3, _ = update(sigma(k), v_new, m1, z1, delta_rule=True)
    expected = m1 + sigma(k).T @ (v_new - v)  # retrieved = v exactly
    assert torch.allclose(m3, expected, atol=1e-5)


def _qkv(layer: MemoryAttention, x: torch.Tensor):
    c = layer.config
    b, t, _ = x.shape
    q, k, v = F.linear(x, layer.qkv.weight, layer.qkv.bias).view(
        b, t, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v


def test_memory_layer_reads_previous_segments_only_and_matches_the_formula():
    torch.manual_seed(2)
    layer = MemoryAttention(MemoryConfig(d_model=8, n_heads=2, use_delta_rule=False))
    x1, x2 = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    out1 = layer(x1)
    # segment 0 reads an empty memory: the output is the projection's bias alone
    assert torch.allclose(out1, layer.out.bias.expand_as(out1), atol=1e-6)
    _, k1, v1 = _qkv(layer, x1)
    expected_m = sigma(k1).transpose(-1, -2) @ v1  # [1, H, d_k, d_v]
    assert torch.allclose(layer.memories[0], expected_m, atol=1e-6)
    assert torch.allclose(layer.memory_norms[0], sigma(k1).sum(-2), atol=1e-6)
    out2 = layer(x2)
    q2, _, _ = _qkv(layer, x2)
    read = (sigma(q2) @ expected_m) / (sigma(q2) @ sigma(k1).sum(-2)[..., None])
    assert torch.allclose(out2, layer.out(read.transpose(1, 2).reshape(1, 3, 8)), atol=1e-5)


def kv_grads(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory layer's K and V projection gradients (rows d:2d and 2d:3d of qkv)."""
    d = model.config.d_model
    grad = model.memory.qkv.weight.grad
    if grad is None:
        return torch.zeros(d, d), torch.zeros(d, d)
    return grad[d:2 * d], grad[2 * d:]


def test_detached_memory_gives_k_and_v_no_gradient_and_each_segment_backpropagates_alone():
    torch.manual_seed(3)
    model = create_model("infini", memory_gradient="none", **TINY)
    ids = torch.randint(0, 50, (2, 24))
    for start in range(0, 24, 8):  # a backward per segment: no "backward a second time" error
        logits = model(ids[:, start:start + 8])
        F.cross_entropy(logits.reshape(-1, 50), ids[:, start:start + 8].reshape(-1)).backward()
    assert model.memory.memories is not None and not model.memory.memories.requires_grad
    assert model.memory.segment_counter == 3
    k, v = kv_grads(model)  # memory-only layer 0: K and V feed nothing but the memory
    assert k.abs().max() == 0 and v.abs().max() == 0


def test_sequence_gradient_reaches_k_and_v_from_a_later_segment_and_never_crosses_sequences():
    torch.manual_seed(3)
    model = create_model("infini", **TINY)  # memory_gradient: sequence, the default
    assert model.config.memory_gradient == "sequence"
    ids = torch.randint(0, 50, (2, 16))
    model.reset_memory()
    model(ids[:, :8])  # segment 0 written to memory
    logits = model(ids[:, 8:])  # segment 1 reads it
    F.cross_entropy(logits.reshape(-1, 50), ids[:, 8:].reshape(-1)).backward()
    k, v = kv_grads(model)
    assert k.abs().max() > 0 and v.abs().max() > 0
    # a new sequence: after reset_memory its first segment's loss reaches no K or V, however
    # much the previous sequence wrote (its graph is gone with the reset)
    model.zero_grad(set_to_none=True)
    model(ids[:, :8])
    model(ids[:, 8:])
    model.reset_memory()
    logits = model(ids[:, :8])
    F.cross_entropy(logits.reshape(-1, 50), ids[:, :8].reshape(-1)).backward()
    k, v = kv_grads(model)
    assert k.abs().max() == 0 and v.abs().max() == 0


def test_sequence_loss_backpropagates_through_the_memory_as_the_manual_sum():
    from newllm.infini.training import sequence_loss

    torch.manual_seed(5)
    model = create_model("infini", **TINY)
    batch = torch.randint(0, 50, (3, 17))
    answers = torch.tensor([-1, 12, -1])  # row 1 is a passkey row: its answer at position 12
    loss = sequence_loss(model, batch, 8, answers)
    model.reset_memory()
    rows = []  # independently: per-row mean NLL (text) or the answer's NLL (passkey)
    lp = torch.cat([model.token_logprobs(model(batch[:, s:s + 8]), batch[:, s + 1:s + 9])
                    for s in (0, 8)], dim=1)
    rows = [-lp[0].mean(), -lp[1, 11], -lp[2].mean()]
    assert torch.allclose(loss, torch.stack(rows).mean(), atol=1e-6)
    loss.backward()
    k, v = kv_grads(model)
    assert k.abs().max() > 0 and v.abs().max() > 0


def test_memory_grad_norms_see_the_answer_reach_k_and_v_only_with_the_sequence_gradient():
    from newllm.infini.training import memory_grad_norms

    torch.manual_seed(6)
    rows = torch.randint(0, 50, (4, 25))
    answers = torch.tensor([20, 18, 23, 17])  # in the third segment: after two writes
    norms = {g: memory_grad_norms(create_model("infini", memory_gradient=g, **TINY), rows,
                                  answers, 8) for g in ("sequence", "none")}
    assert norms["sequence"]["k"] > 0 and norms["sequence"]["v"] > 0
    assert norms["none"]["k"] == 0 and norms["none"]["v"] == 0
    assert norms["none"]["q"] > 0  # the read still learns
    assert memory_grad_norms(create_model("pythia", **TINY), rows, answers, 8) == {}


def test_banks_switch_after_segments_per_bank():
    torch.manual_seed(4)
    layer = MemoryAttention(MemoryConfig(d_model=8, n_heads=2, num_memory_banks=2,
                                         segments_per_bank=2))
    x = torch.randn(1, 4, 8)
    seen = []
    for _ in range(5):
        seen.append(layer.current)
        layer(x)
        filled = (layer.memory_norms.sum(dim=(1, 2, 3)) > 0).tolist()
        if len(seen) <= 2:
            assert filled == [True, False]  # the second bank stays empty for 2 segments
    assert seen == [0, 0, 1, 1, 0]
    assert layer.segment_counter == 5


def test_alibi_decays_older_segments_by_distance():
    torch.manual_seed(5)
    config = MemoryConfig(d_model=8, n_heads=2, use_delta_rule=False, use_alibi=True,
                          alibi_scale=2.0)
    layer = MemoryAttention(config)
    segments = [torch.randn(1, 3, 8) for _ in range(4)]
    per_segment_z = []
    for x in segments:
        _, k, _ = _qkv(layer, x)
        per_segment_z.append(sigma(k).sum(-2)[0])  # [H, d_k]
        layer(x)
    slopes = alibi_slopes(2, 2.0)
    assert torch.allclose(slopes, 2.0 * torch.tensor([2 ** -4, 2 ** -8]))
    last = len(segments) - 1
    # w_i = exp(-slope·d), d = segments written after segment i (the latest weighs 1)
    expected = sum(torch.exp(-slopes * (last - i))[:, None] * z
                   for i, z in enumerate(per_segment_z))
    assert torch.allclose(layer.memory_norms[0, 0], expected, atol=1e-5)
    weights = torch.exp(-slopes[0] * torch.arange(4.0))
    assert all(a > b for a, b in itertools.pairwise(weights))


def test_multi_memory_writes_round_robin_and_hierarchical_gates_coarse_and_fine():
    torch.manual_seed(6)
    layer = MemoryAttention(MemoryConfig(d_model=8, n_heads=2, mode="multi_memory",
                                         num_memories=3))
    x = torch.randn(2, 4, 8)
    for step in range(4):
        assert layer.current == step % 3
        layer(x)
    assert (layer.memory_norms.sum(dim=(1, 2, 3)) > 0).all()
    hier = MemoryAttention(MemoryConfig(d_model=8, n_heads=2, mode="hierarchical",
                                        num_memories=2))
    hier(torch.randn(1, 4, 8))
    hier(torch.randn(1, 4, 8))
    x = torch.randn(1, 4, 8)
    q, _, _ = _qkv(hier, x)
    coarse = retrieve(sigma(q), hier.memories.sum(0), hier.memory_norms.sum(0))
    with torch.no_grad():
        hier.gate.weight.zero_()
        hier.gate.bias.fill_(-50.0)  # gate closed: the coarse memory alone
        out = hier(x, update_memory=False)
    assert torch.allclose(out, hier.out(coarse.transpose(1, 2).reshape(1, 4, 8)), atol=1e-5)


def test_factory_kinds_have_matched_parameters_and_unknown_options_are_errors():
    counts = {kind: count_parameters(create_model(kind, **TINY))
              for kind in ("pythia", "infini", "multi_memory", "hierarchical")}
    assert counts["pythia"] == counts["infini"] == counts["multi_memory"]
    assert 0 < counts["hierarchical"] - counts["pythia"] <= 16 + 1  # the gate only
    with pytest.raises(NewllmError, match="unknown option"):
        create_model("infini", use_alibbi=True)
    with pytest.raises(NewllmError, match="model kind 'nope'"):
        create_model("nope")
    assert create_model("infini", use_alibi=True, **TINY).config.use_alibi


@pytest.mark.parametrize("kind", ["infini", "multi_memory", "hierarchical"])
def test_memory_state_moves_between_models_through_safetensors(kind, tmp_path):
    torch.manual_seed(7)
    a = create_model(kind, num_memory_banks=2, segments_per_bank=1, **TINY)
    ids = torch.randint(0, 50, (1, 8))
    for _ in range(3):
        a(torch.randint(0, 50, (1, 8)))
    state = a.get_memory_state()
    assert set(state) == set(STATE_KEYS[kind])
    digest = a.save_memory_state(tmp_path / "memory.safetensors")
    assert len(digest) == 64
    b = create_model(kind, num_memory_banks=2, segments_per_bank=1, **TINY)
    b.load_state_dict(a.state_dict())
    b.load_memory_state(tmp_path / "memory.safetensors")
    with torch.no_grad():
        assert torch.equal(a(ids, update_memory=False), b(ids, update_memory=False))
        b.reset_memory()
        assert not torch.allclose(a(ids, update_memory=False), b(ids, update_memory=False))
    for key in state:
        assert torch.equal(b.get_memory_state()[key], torch.zeros_like(state[key])) or \
            key in STATE_KEYS[kind][2:]


@pytest.mark.parametrize("kind,options", [
    ("infini", {"use_delta_rule": True, "use_alibi": True}),
    ("infini", {"use_delta_rule": False, "num_memory_banks": 2, "segments_per_bank": 1}),
    ("multi_memory", {}), ("hierarchical", {})])
def test_write_memory_leaves_the_state_forward_leaves(kind, options):
    torch.manual_seed(3)
    model = create_model(kind, **options, **TINY)
    segments = [torch.randint(0, 50, (2, 8)) for _ in range(4)]
    model.reset_memory()
    with torch.no_grad():
        for segment in segments:
            model(segment)
    by_forward = model.get_memory_state()
    model.reset_memory()
    for segment in segments:
        model.write_memory(segment)
    by_write = model.get_memory_state()
    assert by_forward[STATE_KEYS[kind][0]].abs().sum() > 0
    for key in by_forward:
        assert torch.allclose(by_write[key], by_forward[key], rtol=0, atol=1e-6), key
    probe = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        after_write = model(probe, update_memory=False)
        model.set_memory_state(by_forward)
        assert torch.allclose(after_write, model(probe, update_memory=False), atol=1e-6)


def test_loading_memory_into_another_shape_is_a_clear_error(tmp_path):
    a = create_model("infini", **TINY)
    a(torch.randint(0, 50, (1, 8)))
    a.save_memory_state(tmp_path / "m.safetensors")
    other = create_model("infini", **{**TINY, "n_heads": 4})
    with pytest.raises(NewllmError, match="n_heads=2 but this model has n_heads=4"):
        other.load_memory_state(tmp_path / "m.safetensors")
    wrong = {**a.get_memory_state()}
    wrong["memories"] = wrong["memories"][:, :, :1]
    with pytest.raises(NewllmError, match="'memories' has shape"):
        a.set_memory_state(wrong)
    with pytest.raises(NewllmError, match="is a 'infini-memory-state' artifact, expected"):
        from newllm.core.artifacts import load_artifact
        load_artifact(tmp_path / "m.safetensors", kind="infini-lm")
    multi = create_model("multi_memory", **TINY)
    with pytest.raises(NewllmError, match="kind=infini"):
        multi.load_memory_state(tmp_path / "m.safetensors")


def test_shortlist_gives_a_distribution_over_the_whole_vocabulary():
    torch.manual_seed(8)
    model = create_model("pythia", **{**TINY, "shortlist": 10})
    counts = torch.arange(50).float()
    model.set_vocabulary(torch.arange(40, 50), counts)
    logits = model(torch.randint(0, 50, (2, 5)))
    full = model.full_logprobs(logits)
    assert torch.allclose(full.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    targets = torch.randint(0, 50, (2, 5))
    assert torch.allclose(model.token_logprobs(logits, targets),
                          full.gather(-1, targets[..., None])[..., 0], atol=1e-6)
    # within "other", a token's share is its smoothed count: p(3)/p(1) = (3+1)/(1+1)
    assert math.isclose(float((full[0, 0, 3] - full[0, 0, 1]).exp()), 2.0, rel_tol=1e-4)


def test_stream_nll_is_the_sum_over_segments_with_memory_carried():
    from newllm.infini.training import stream_logprobs

    torch.manual_seed(9)
    model = create_model("infini", **TINY).eval()
    ids = torch.randint(0, 50, (20,))
    lp = stream_logprobs(model, ids, 8)
    model.reset_memory()
    manual = []
    with torch.no_grad():
        for start in range(0, 19, 8):
            logits = model(ids[None, start:min(start + 8, 19)])
            manual.append(torch.log_softmax(logits, -1)[0].gather(
                -1, ids[start + 1:min(start + 9, 20), None])[:, 0])
    assert torch.allclose(lp, torch.cat(manual), atol=1e-6)


def test_training_stream_places_every_fact_and_keeps_the_budget():

    from newllm.infini.training import make_sequences, training_stream

    docs = [torch.full((5,), i + 10) for i in range(10)]
    facts = [[1, 2], [3, 4]]
    stream = training_stream(docs, facts, 0, 30, random.Random(0))
    assert len(stream) == 30 and stream[0] == 0
    text = stream.tolist()
    assert any(text[i:i + 3] == [0, 1, 2] for i in range(len(text)))
    assert any(text[i:i + 3] == [0, 3, 4] for i in range(len(text)))
    seqs = make_sequences(stream, 8)
    assert seqs.shape == (3, 9) and torch.equal(seqs[1, 0], seqs[0, -1])
    with pytest.raises(NewllmError, match=r"more than train_lm\.max_train_tokens"):
        training_stream(docs, facts * 10, 0, 20, random.Random(0))
