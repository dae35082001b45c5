"""The edit's checks that can fail (newllm/chameleon/checks.py) on the tiny model: they pass
with the real hooks and each fails with a deliberately broken one; and the resumed pass that
scores every edited condition equals a full edited pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from newllm.chameleon.checks import edit_checks, failed_checks
from newllm.chameleon.editing import LayerEdit, edit_of, projection_edit, resolve_targets
from newllm.chameleon.lm import shared_lower_scores, tag_logprobs

PROMPTS = [[5, 17, 42, 8, 9, 30], [3, 4, 6], [7, 21, 22, 23]]
ALPHA, BETA, RATIO = 0.6, 0.4, 0.025


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from newllm.core.base import load_base

    return load_base(str(tiny_model), device="cpu").model


def _edits(model, layers=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return [LayerEdit(t, torch.randn(d, generator=g), torch.randn(d, generator=g))
            for t in resolve_targets(model, list(layers), "test.layers")]


def _hooked(model, edits, transform, extra_paths=()):
    """A context manager like projection_edit whose hook returns transform(x, edit)."""
    @contextlib.contextmanager
    def context(_model, _edits, alpha, beta, ratio, _stats=None) -> Iterator[None]:
        handles = []
        for layer_edit in edits:
            def hook(_m, _i, x, layer_edit=layer_edit):
                p_hat, n_hat = layer_edit.directions(x)
                return transform(x, edit_of(x, p_hat, n_hat, alpha, beta, ratio))
            handles.append(model.get_submodule(layer_edit.target.path).register_forward_hook(hook))
        for path in extra_paths:  # an edit that leaks onto another module
            handles.append(model.get_submodule(path).register_forward_hook(
                lambda _m, _i, x: x * 1.01))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
    return context


def test_the_checks_pass_with_the_real_hooks(tiny):
    edits = _edits(tiny)
    checks = edit_checks(tiny, PROMPTS, edits, ALPHA, BETA, RATIO, pad_id=0)
    assert failed_checks(checks, ALPHA) == [] and checks["checks_passed"]
    assert checks["check_restored_bit_identical"] and checks["check_lower_layers_bit_identical"]
    assert checks["check_hooked_edit_max_rel_error"] < 1e-5
    assert checks["check_theta_p_gain"] == pytest.approx(ALPHA, rel=1e-4)
    assert checks["check_resumed_pass_max_abs_diff"] == 0.0


@pytest.mark.parametrize(("transform", "extra", "fails"), [
    (lambda x, e: x + 1.5 * e, (), {"check_hooked_edit_max_rel_error", "check_theta_p_gain"}),
    (lambda x, e: x - e, (), {"check_hooked_edit_max_rel_error", "check_theta_p_gain"}),
    # an edit leaking below the first edited layer: the resumed pass (which skips it) differs
    (lambda x, e: x + e, ("model.layers.0.mlp",), {"check_lower_layers_bit_identical",
                                                   "check_resumed_pass_max_abs_diff"}),
])
def test_a_broken_hook_makes_the_checks_fail(tiny, transform, extra, fails):
    edits = _edits(tiny)
    checks = edit_checks(tiny, PROMPTS, edits, ALPHA, BETA, RATIO, pad_id=0,
                         edit=_hooked(tiny, edits, transform, extra))
    failed = {name.split(" ")[0] for name in failed_checks(checks, ALPHA)}
    assert failed == fails and not checks["checks_passed"]


def test_a_hook_left_behind_fails_the_restored_check(tiny):
    edits = _edits(tiny)

    @contextlib.contextmanager
    def leaky(model, edits_, alpha, beta, ratio, _stats=None):
        with projection_edit(model, edits_, alpha, beta, ratio):
            yield
        # a stray hook stays on the module after the block
        tiny.get_submodule(edits_[0].target.path).register_forward_hook(
            lambda _m, _i, x: x + 1e-3)

    try:
        checks = edit_checks(tiny, PROMPTS, edits, ALPHA, BETA, RATIO, pad_id=0, edit=leaky)
        assert "check_restored_bit_identical" in failed_checks(checks, ALPHA)
    finally:
        for module in tiny.modules():
            module._forward_hooks.clear()


def test_resumed_conditions_equal_full_edited_passes(tiny):
    """shared_lower_scores: the lower layers once, every condition resumed above them, equal
    bit for bit to scoring each condition with a full pass."""
    tags = [[11], [12, 13], [14, 15, 16]]
    edits = {"a": _edits(tiny, (1,), seed=1), "b": _edits(tiny, (0, 1), seed=2)}
    for name, start in (("a", 1), ("b", 0)):
        context = {name: lambda name=name: projection_edit(tiny, edits[name], 2.0, 1.0, 0.3)}
        found = shared_lower_scores(tiny, PROMPTS, tags, context, start_layer=start,
                                    batch_size=2, pad_id=0)
        with projection_edit(tiny, edits[name], 2.0, 1.0, 0.3):
            full = tag_logprobs(tiny, PROMPTS, tags, batch_size=2, pad_id=0)
        assert torch.equal(found[name], full)
        assert torch.equal(found["base"], tag_logprobs(tiny, PROMPTS, tags, batch_size=2,
                                                       pad_id=0))
        assert not torch.equal(found[name], found["base"])
