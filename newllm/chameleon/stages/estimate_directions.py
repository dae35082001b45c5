"""estimate-directions: θ_p and θ_n per target layer from the self-generations' MLP outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.chameleon import DIRECTIONS_KIND, GENERATIONS_KIND
from newllm.chameleon.directions import (
    MISMATCHED_PREFIX,
    SCOPES,
    SIGN_CONVENTION,
    THETA_N_METHODS,
    estimate,
)
from newllm.chameleon.editing import resolve_targets
from newllm.chameleon.lm import POOLINGS, pooled_states
from newllm.core.artifacts import load_artifact, save_artifact, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.params import as_dict, param
from newllm.core.tokens import pad_token_id, separator_token_id


@dataclass
class EstimateDirectionsParams:
    group = "estimate_directions"
    generations: str = param("artifacts/chameleon/generations.safetensors",
                             "self-generate output.")
    # param() gives a list default a default_factory, so instances never share it
    target_decoder_layers: list[int | str] = param([21, 29], "Modules whose outputs give the "  # noqa: RUF009
                                                   "states (and are edited later): decoder "
                                                   "layer indices (their .mlp; 0 = the first "
                                                   "decoder layer, negative from the end) or "
                                                   "module paths.")
    pooling: str = param("mean", "Pool each generation's states by mean or last token.",
                         choices=POOLINGS)
    with_prompt: bool = param(True, "Read each generation after its own prompt (else after "
                              "the separator token alone); only generated tokens are pooled.")
    center: bool = param(False, "Subtract the column mean before each SVD (the seed does not; "
                         "centering the difference removes its mean shift).")
    theta_n_method: str = param("diff_svd", "θ_n: first right singular vector of "
                                "personalized − neutral (diff_svd, the seed's 'CCS') or their "
                                "mean difference (diff_mean).", choices=THETA_N_METHODS)
    direction_scope: str = param("global", "One pair of directions from all users, or one per "
                                 "user (from that user's own generations).", choices=SCOPES)
    batch_size: int = param(8, "Sequences per forward pass.", min=1)
    out: str = param("artifacts/chameleon/directions.safetensors", "Output artifact.",
                     output="artifact")
    metrics: str = param("metrics/chameleon/directions.json", "Metrics file.", output="metrics")


def _rows(gen: dict[str, torch.Tensor], kind: str) -> list[tuple[list[int], list[int]]]:
    p_ids, p_off = gen[f"{kind}.prompt_ids"].tolist(), gen[f"{kind}.prompt_offsets"].tolist()
    g_ids, g_off = gen[f"{kind}.gen_ids"].tolist(), gen[f"{kind}.gen_offsets"].tolist()
    return [(p_ids[p_off[i]:p_off[i + 1]], g_ids[g_off[i]:g_off[i + 1]])
            for i in range(len(p_off) - 1)]


@stage_command("estimate-directions", BaseParams, EstimateDirectionsParams,
               help="Read the self-generations with the frozen base, pool each target module's "
                    "output over the generated tokens, and estimate θ_p (first right singular "
                    "vector of the personalized states) and θ_n (of personalized − neutral, or "
                    "their mean difference) per layer, uncentered by default; save them with "
                    "their quality figures.")
def estimate_directions(base_params: BaseParams, params: EstimateDirectionsParams) -> None:
    base = base_params.load()
    targets = resolve_targets(base.model, params.target_decoder_layers,
                              "estimate_directions.target_decoder_layers")
    generations = load_artifact(params.generations, kind=GENERATIONS_KIND,
                                base=base.info.as_dict())
    frozen = freeze(base.model)
    pad = pad_token_id(base.tokenizer, base.model)
    sep = [separator_token_id(base.tokenizer, base_params.separator_token)]
    paths = [t.path for t in targets]
    start = time.perf_counter()
    states = {}
    for kind in ("personalized", "neutral"):
        rows = _rows(generations.tensors, kind)
        if not params.with_prompt:
            rows = [(sep, g) for _, g in rows]
        states[kind] = pooled_states(base.model, rows, paths, pooling=params.pooling,
                                     batch_size=params.batch_size, pad_id=pad,
                                     desc=f"states {kind}")
    # the mismatched-profile null: the direction users' personalized generations read after
    # the prompt with another direction user's profile (global scope, read after a prompt)
    mismatched = params.direction_scope == "global" and params.with_prompt
    if mismatched:
        t = generations.tensors
        prompts = t["mismatched.prompt_ids"].tolist(), t["mismatched.prompt_offsets"].tolist()
        generated = [g for _, g in _rows(t, "personalized")]
        rows = [(prompts[0][prompts[1][i]:prompts[1][i + 1]], generated[i])
                for i in range(len(prompts[1]) - 1)]
        states["mismatched"] = pooled_states(base.model, rows, paths, pooling=params.pooling,
                                             batch_size=params.batch_size, pad_id=pad,
                                             desc="states mismatched")
    seconds = time.perf_counter() - start
    check_unchanged(base.model, frozen, "estimate-directions")

    users = generations.meta["extra"]["users"]
    if params.direction_scope == "global":
        direction_users = set(generations.meta["extra"]["direction_users"])
        keep = [i for i, u in enumerate(users) if u in direction_users]
        users = [users[i] for i in keep]
    tensors, layers, metrics = {}, {}, {}
    for target in targets:
        name = f"layer{target.layer}" if target.layer is not None else \
            target.path.replace(".", "_")
        p, q = states["personalized"][target.path], states["neutral"][target.path]
        if params.direction_scope == "global":
            found = estimate(p[keep], q[keep], center=params.center,
                             theta_n_method=params.theta_n_method)
            theta_p, theta_n, quality = found.theta_p, found.theta_n, found.quality
        else:
            # one pair per user, from that user's own (one-row) matrices
            each = [estimate(p[i:i + 1], q[i:i + 1], center=False,
                             theta_n_method=params.theta_n_method) for i in range(len(users))]
            theta_p = torch.stack([e.theta_p for e in each])
            theta_n = torch.stack([e.theta_n for e in each])
            quality = {k: sum(e.quality[k] for e in each) / len(each) for k in each[0].quality}
        tensors[f"{name}.theta_p"], tensors[f"{name}.theta_n"] = theta_p, theta_n
        if mismatched:
            # self-generate puts the direction users first, in the same order as `keep`
            m = states["mismatched"][target.path]
            other = estimate(m, q[keep], center=params.center,
                             theta_n_method=params.theta_n_method)
            tensors[f"{MISMATCHED_PREFIX}{name}.theta_p"] = other.theta_p
            tensors[f"{MISMATCHED_PREFIX}{name}.theta_n"] = other.theta_n
            metrics[f"{name}_mismatched_theta_p_cos"] = float(other.theta_p @ theta_p)
            metrics[f"{name}_mismatched_theta_n_cos"] = float(other.theta_n @ theta_n)
        layers[target.path] = {"name": name, "layer": target.layer, "module": target.path,
                               "center": params.center, "sign": SIGN_CONVENTION,
                               "hidden_size": int(p.shape[1]), "quality": quality}
        metrics.update({f"{name}_{k}": v for k, v in quality.items()})
        metrics[f"{name}_state_norm_mean"] = float(p.norm(dim=1).mean())
    save_artifact(params.out, tensors, kind=DIRECTIONS_KIND, stage="estimate-directions",
                  params=as_dict(base_params, params), base=base.info.as_dict(),
                  extra={"layers": layers, "direction_scope": params.direction_scope,
                         "mismatched": mismatched,
                         "users": users, "theta_n_method": params.theta_n_method,
                         "pooling": params.pooling, "center": params.center,
                         "generations": str(params.generations),
                         "num_layers": base.info.num_layers,
                         "hidden_size": base.info.hidden_size})
    write_metrics(Path(params.metrics), {
        **frozen.as_metrics(), "weights_unchanged": True, "users": len(users),
        "layers": len(targets), "hidden_size": base.info.hidden_size,
        "seconds": round(seconds, 2), **metrics})
    for path, meta in layers.items():
        q = meta["quality"]
        click.echo(f"{path}: σ1 share P {q['sigma1_share_p']:.3f}, D "
                   f"{q['sigma1_share_diff']:.3f}; rows of D to θ_n cos {q['diff_cos_mean']:.3f};"
                   f" θ_p·θ_n {q['theta_p_dot_theta_n']:.3f} ({q['angle_deg']:.1f}°)")
