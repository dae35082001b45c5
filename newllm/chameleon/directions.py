"""θ_p and θ_n per layer from personalized and neutral states, and the directions artifact.

With P [N, d] the pooled states of the personalized generations and Q [N, d] those of the
neutral ones (row i of both from the same user):
- θ_p = the first right singular vector of P;
- θ_n (`diff_svd`, the seed's method, which it calls "CCS") = the first right singular
  vector of D = P − Q; (`diff_mean`) = the mean row of D, normalized.
Both are **uncentered** by default (`center: false`), as the seed computes them: centering D
would remove its mean shift, which is the personalized-vs-neutral signal.

Sign convention (an SVD's sign is arbitrary): θ_p points so that the mean of P·θ_p is
>= 0, θ_n so that the mean of D·θ_n is >= 0 (from neutral toward personalized). The edit
does not depend on either sign; an exported control vector does.

Quality figures per layer: the share of variance (squared singular values) of σ1 in P and in
D, the mean cosine of D's rows to θ_n, and the cosine and angle between θ_p and θ_n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from newllm.chameleon import DIRECTIONS_KIND
from newllm.core.artifacts import Artifact, load_artifact
from newllm.core.errors import NewllmError

THETA_N_METHODS = ("diff_svd", "diff_mean")
SCOPES = ("global", "per_user")
MISMATCHED_PREFIX = "mismatched."
SIGN_CONVENTION = ("theta_p: mean of personalized states . theta_p >= 0; theta_n: mean of "
                   "(personalized - neutral) . theta_n >= 0")


def first_right_singular(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The first right singular vector of `matrix` [N, d] and σ1's share of Σσ² (float64)."""
    m = matrix.double()
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    total = float((s ** 2).sum())
    return vh[0], (float(s[0] ** 2) / total if total > 0 else 0.0)


def _oriented(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return -v if float((rows.double() @ v).mean()) < 0 else v


@dataclass(frozen=True)
class LayerDirections:
    theta_p: torch.Tensor  # [d] (unit, float32)
    theta_n: torch.Tensor
    quality: dict[str, float]


def estimate(personal: torch.Tensor, neutral: torch.Tensor, *, center: bool = False,
             theta_n_method: str = "diff_svd") -> LayerDirections:
    """θ_p and θ_n of one layer (see the module docstring)."""
    if personal.shape != neutral.shape or personal.dim() != 2 or len(personal) == 0:
        raise ValueError(f"expected two [N, d] matrices, got {tuple(personal.shape)} and "
                         f"{tuple(neutral.shape)}")
    p = personal.double()
    d = p - neutral.double()
    p_used = p - p.mean(0) if center else p
    d_used = d - d.mean(0) if center else d
    theta_p, share_p = first_right_singular(p_used)
    theta_p = _oriented(theta_p, p)
    _, share_d = first_right_singular(d_used)
    if theta_n_method == "diff_svd":
        theta_n, _ = first_right_singular(d_used)
    elif theta_n_method == "diff_mean":
        mean = d.mean(0)
        theta_n = mean / mean.norm().clamp_min(1e-12)
    else:
        raise ValueError(f"unknown theta_n_method {theta_n_method!r}")
    theta_n = _oriented(theta_n, d)
    row_cos = (d @ theta_n) / d.norm(dim=1).clamp_min(1e-12)
    dot = float(theta_p @ theta_n)
    quality = {
        "sigma1_share_p": share_p, "sigma1_share_diff": share_d,
        "diff_cos_mean": float(row_cos.mean()), "theta_p_dot_theta_n": dot,
        "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, dot)))),
    }
    return LayerDirections(theta_p.float(), theta_n.float(), quality)


def random_like(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random direction (Gaussian, so uniform on the sphere) with the norm of `theta`."""
    r = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
    return (r / r.norm(dim=-1, keepdim=True) * theta.double().norm(dim=-1, keepdim=True)).float()


@dataclass(frozen=True)
class Directions:
    """A directions artifact: per layer θ_p, θ_n ([d] global, [U, d] per user) and metadata."""

    artifact: Artifact
    layers: dict[str, dict[str, Any]]  # module path -> its metadata (layer, quality, ...)
    scope: str
    users: list[str]
    has_mismatched: bool = False  # also the mismatched-profile null's directions

    def theta(self, path: str, mismatched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """θ_p, θ_n of a layer; `mismatched`: those estimated the same way from generations
        read after another user's profile (the stronger null control)."""
        name = self.layers[path]["name"]
        prefix = MISMATCHED_PREFIX if mismatched else ""
        return (self.artifact[f"{prefix}{name}.theta_p"],
                self.artifact[f"{prefix}{name}.theta_n"])


def load_directions(path: str | Path, base: dict[str, Any]) -> Directions:
    artifact = load_artifact(path, kind=DIRECTIONS_KIND, base=base)
    extra = artifact.meta["extra"]
    return Directions(artifact, extra["layers"], extra["direction_scope"], extra["users"],
                      bool(extra["mismatched"]))


def select_layers(directions: Directions, spec: list[int | str] | None, key: str) -> list[str]:
    """None (all of the directions' layers), or a subset of them: decoder layer indices (as
    estimate-directions resolved them) or module paths."""
    available = directions.layers
    if spec is None:
        return list(available)
    by_index = {str(meta["layer"]): path for path, meta in available.items()
                if meta["layer"] is not None}
    chosen = []
    for item in spec:
        name = str(item).strip()
        path = by_index.get(name, name if name in available else None)
        if path is None:
            listed = ", ".join(f"{m['layer']} ({p})" for p, m in available.items())
            raise NewllmError(f"{key}: layer {item!r} is not among the layers of "
                              f"{directions.artifact.path} ({listed}); choose a subset of them "
                              "or null (all).")
        chosen.append(path)
    if not chosen:
        raise NewllmError(f"{key} is empty; give null (all) or a subset of the directions' "
                          "layers.")
    return chosen
