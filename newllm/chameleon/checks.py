"""Checks of the edit that can fail: they measure what the hooks did inside the real model.

On a batch of evaluation prompts (`edit_checks`):
- **restored**: after the edit's context manager exits, the logits equal the unedited base's
  bit for bit and no hook is left on any module;
- **lower layers**: within an edited pass, the output of every decoder layer below the first
  hooked one is bit-identical to the unedited pass;
- **hooked output**: at each hooked MLP, the output the model goes on with minus the MLP's own
  output (recorded by a hook registered before the edit's) is the edit computed independently
  in float64 from that output (`edit_of`), to float32 rounding;
- **θ_p gain**: with alpha only (beta 0, no ratio control), the measured change of the
  projection on θ̂_p at the hooked layers, regressed on the projection itself, is alpha (sign
  and size);
- **resumed pass**: the pass resumed at the first edited layer from the unedited pass's
  recorded input (how every edited condition is scored) gives the logits of a full edited
  pass.

A wrong layer, a wrong sign or scale, a hook left behind or an edit leaking below its layer
makes one of them fail; tests/test_chameleon_checks.py breaks the hook on purpose to see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from newllm.chameleon.editing import LayerEdit, capture_outputs, edit_of, projection_edit
from newllm.chameleon.lm import capture_layer_input, device_of, run_from_layer
from newllm.core.hidden import decoder_of
from newllm.core.tokens import left_pad

EditContext = Callable[..., contextlib.AbstractContextManager]
HOOKED_EDIT_TOLERANCE = 1e-5  # max |measured - computed edit| / max |computed edit|
GAIN_TOLERANCE = 1e-4  # relative error of the measured θ_p gain against alpha


def _decoder_prefix(model: torch.nn.Module) -> str:
    decoder = decoder_of(model)
    return next(name for name, module in model.named_modules() if module is decoder)


def _no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@torch.inference_mode()
def edit_checks(model: torch.nn.Module, prompts: list[list[int]], edits: list[LayerEdit],
                alpha: float, beta: float, target_edit_ratio: float, pad_id: int,
                row_hook: Callable[[list[int]], None] | None = None,
                edit: EditContext = projection_edit) -> dict[str, Any]:
    """The checks of the module docstring on `prompts` (one batch); `edit` is the context
    manager that applies the edits (`projection_edit`; a test passes a broken one)."""
    device = device_of(model)
    ids, mask, positions = left_pad(prompts, pad_id, device)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
              "use_cache": False}
    if row_hook is not None:
        row_hook(list(range(len(prompts))))
    hooked = [e.target.path for e in edits]
    layers = [e.target.layer for e in edits]
    if any(layer is None for layer in layers):
        raise ValueError("the checks need edits on decoder layers")
    first = min(layers)  # type: ignore[type-var]
    lower = [f"{_decoder_prefix(model)}.layers.{i}" for i in range(first)]

    with capture_outputs(model, lower) as plain_lower:
        plain = model(**inputs).logits
    with capture_outputs(model, hooked) as raw, \
            edit(model, edits, alpha, beta, target_edit_ratio), \
            capture_outputs(model, hooked) as post, \
            capture_outputs(model, lower) as edited_lower:
        edited = model(**inputs).logits
    after = model(**inputs).logits
    restored = bool(torch.equal(plain, after)) and _no_hooks_left(model)

    lower_same = all(torch.equal(plain_lower[p][0], edited_lower[p][0]) for p in lower)
    errors = []
    for layer_edit in edits:
        path = layer_edit.target.path
        x = raw[path][0].double()
        p_hat, n_hat = (v.double() for v in layer_edit.directions(x))
        expected = edit_of(x, p_hat, n_hat, alpha, beta, target_edit_ratio)
        measured = post[path][0].double() - x
        errors.append(float((measured - expected).abs().max()
                            / expected.abs().max().clamp_min(1e-30)))

    # alpha alone: the projection on θ̂_p must move by alpha times itself
    with capture_outputs(model, hooked) as raw_p, edit(model, edits, alpha, 0.0, 0.0), \
            capture_outputs(model, hooked) as post_p:
        model(**inputs)
    num = den = 0.0
    real = mask.bool()
    for layer_edit in edits:
        path = layer_edit.target.path
        x = raw_p[path][0].double()
        p_hat, _ = (v.double() for v in layer_edit.directions(x))
        p_rows = p_hat[:, None, :] if p_hat.dim() == 2 else p_hat
        along = (x * p_rows).sum(-1)[real]
        moved = ((post_p[path][0].double() - x) * p_rows).sum(-1)[real]
        num += float((moved * along).sum())
        den += float((along * along).sum())
    gain = num / den if den > 0 else 0.0

    # the resumed pass against the full edited pass
    with capture_layer_input(model, first) as found:
        model(**inputs)
    with edit(model, edits, alpha, beta, target_edit_ratio):
        resumed = run_from_layer(model, found[0], first, ids.shape[1])
    resumed_diff = float((resumed - edited).abs().max())

    checks = {
        "check_restored_bit_identical": restored,
        "check_lower_layers_bit_identical": lower_same,
        "check_edit_changes_logits": not bool(torch.equal(plain, edited)),
        "check_hooked_edit_max_rel_error": max(errors),
        "check_theta_p_gain": gain,
        "check_resumed_pass_max_abs_diff": resumed_diff,
    }
    checks["checks_passed"] = failed_checks(checks, alpha) == []
    return checks


def failed_checks(checks: dict[str, Any], alpha: float) -> list[str]:
    """The names of the checks that failed, each with what it measured."""
    failed = [name for name in ("check_restored_bit_identical",
                                "check_lower_layers_bit_identical",
                                "check_edit_changes_logits") if not checks[name]]
    if not checks["check_hooked_edit_max_rel_error"] <= HOOKED_EDIT_TOLERANCE:
        failed.append(f"check_hooked_edit_max_rel_error "
                      f"({checks['check_hooked_edit_max_rel_error']:.3g})")
    if not abs(checks["check_theta_p_gain"] - alpha) <= GAIN_TOLERANCE * max(abs(alpha), 1e-12):
        failed.append(f"check_theta_p_gain ({checks['check_theta_p_gain']:.6g}, alpha {alpha})")
    if not checks["check_resumed_pass_max_abs_diff"] <= 1e-4:
        failed.append(f"check_resumed_pass_max_abs_diff "
                      f"({checks['check_resumed_pass_max_abs_diff']:.3g})")
    return failed
