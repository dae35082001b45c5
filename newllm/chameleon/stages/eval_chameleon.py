"""eval-chameleon: does projection editing help, by how much, and would a random direction do
the same? Accuracy and macro-F1 with bootstrap intervals for four conditions, two scorings."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from newllm.chameleon.data import (
    class_balance,
    majority_accuracy,
    profile_free_oracle_accuracy,
    tag_key,
)
from newllm.chameleon.directions import load_directions, random_like, select_layers
from newllm.chameleon.editing import (
    EditStats,
    LayerEdit,
    RowSelect,
    Target,
    capture_outputs,
    edit_of,
    projection_edit,
)
from newllm.chameleon.export import write_control_vector
from newllm.chameleon.lm import generate, tag_logprobs
from newllm.chameleon.params import ChameleonDataParams
from newllm.chameleon.prompts import CONDITION_PROMPTS, answer_prefix, as_model_input, fill
from newllm.chameleon.scoring import (
    INVALID,
    bootstrap_ci,
    entropy,
    exact_tag,
    paired_bootstrap,
    parse_tag,
    resamples,
)
from newllm.core.artifacts import write_csv, write_json, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.params import as_dict, param
from newllm.core.tokens import left_pad, pad_token_id

CONDITIONS = ("no_profile", "personalized", "edit", "null")
SCORINGS = {"generate": ("gen",), "likelihood": ("lik",), "both": ("gen", "lik")}


@dataclass
class EvalChameleonParams:
    group = "eval_chameleon"
    directions: str = param("artifacts/chameleon/directions.safetensors",
                            "estimate-directions output.")
    layers: list[int | str] | None = param(None, "Layers to edit: null = all of the "  # noqa: RUF009
                                           "directions' layers, or a subset of them (decoder "
                                           "layer indices or module paths).")
    alpha: float = param(0.6, "Weight of the personal projection (added).")
    beta: float = param(0.4, "Weight of the neutral projection (|beta| is subtracted).")
    target_edit_ratio: float = param(0.025, "Rescale each token's edit to this share of the "
                                     "MLP output's norm (0 = no edit-ratio control).", min=0)
    edit_prompt: str = param("personalized", "Prompt the edit and the null control are applied "
                             "to.", choices=("personalized", "no_profile"))
    scoring: str = param("both", "generate (parse the answer), likelihood (best-scoring tag) "
                         "or both.", choices=tuple(SCORINGS))
    max_new_tokens: int = param(10, "Tokens generated per answer.", min=1)
    batch_size: int = param(8, "Prompts per batch.", min=1)
    bootstrap: int = param(1000, "Bootstrap resamples for the intervals.", min=10)
    # param() gives a list default a default_factory, so instances never share it
    sweep_alphas: list[float] = param([1.2, 2.4], "Alphas of the accuracy-vs-alpha plot "  # noqa: RUF009
                                      "(likelihood scoring; beta and target_edit_ratio scaled "
                                      "by alpha/eval_chameleon.alpha; the personalized prompt "
                                      "is alpha 0); [] = no sweep.")
    seed: int = param(0, "Seed of the null control's random directions and the bootstrap.",
                      min=0)
    control_vector: str = param("artifacts/chameleon/control_vector.gguf", "llama.cpp "
                                "control-vector GGUF of the mean edit per layer.", output="gguf")
    predictions: str = param("artifacts/chameleon/predictions.json", "Per-question gold and "
                             "predictions.", output="metrics")
    metrics: str = param("metrics/chameleon/eval.json", "Metrics file.", output="metrics")
    plot: str = param("plots/chameleon_alpha.csv", "Accuracy vs alpha, edit and null control.",
                      output="plot")

    def check(self) -> None:
        if self.alpha == 0 and self.sweep_alphas:
            raise NewllmError("eval_chameleon.alpha is 0, so the sweep cannot scale beta with "
                              "it; set sweep_alphas to [] or alpha to a non-zero value.")


@stage_command("eval-chameleon", BaseParams, ChameleonDataParams, EvalChameleonParams,
               help="On the evaluation users: tag accuracy and macro-F1 (95% bootstrap "
                    "intervals) with no profile, the personalized prompt, projection editing, "
                    "and a null control (random directions, same alpha/beta), by generation "
                    "and by tag likelihood; paired differences; the edit's numerical checks; "
                    "accuracy vs alpha; the mean edit as a llama.cpp control vector.")
def eval_chameleon(base_params: BaseParams, data: ChameleonDataParams,
                   params: EvalChameleonParams) -> None:
    base = base_params.load()
    directions = load_directions(params.directions, base.info.as_dict())
    paths = select_layers(directions, params.layers, "eval_chameleon.layers")
    task = data.task()
    questions = data.split(task).evaluation
    users = [q.user for q in questions]
    if directions.scope == "global":
        shared = sorted(set(directions.users) & set(users))
        if shared:
            raise NewllmError(f"{directions.artifact.path} was estimated from evaluation users "
                              f"({', '.join(shared[:5])}); the split must keep them apart "
                              "(same chameleon_data for self-generate and eval-chameleon).")
        rows = None
    else:
        missing = [u for u in users if u not in directions.users]
        if missing:
            raise NewllmError(f"{directions.artifact.path} holds per-user directions but none "
                              f"for evaluation user {missing[0]}; run self-generate with "
                              "users: all.")
        table_row = {u: i for i, u in enumerate(directions.users)}
        rows = RowSelect()

    model, tokenizer = base.model, base.tokenizer
    frozen = freeze(model)
    chat = data.chat_template
    prompts = {name: [tokenizer(as_model_input(tokenizer, fill(template, q, name), chat),
                                add_special_tokens=False)["input_ids"] for q in questions]
               for name, template in CONDITION_PROMPTS.items()}
    prompts["edit"] = prompts["null"] = prompts[params.edit_prompt]
    prefix = answer_prefix(tokenizer, chat)
    tag_ids = [tokenizer(prefix + t, add_special_tokens=False)["input_ids"] for t in task.tags]
    pad = pad_token_id(tokenizer, model)
    eos = sorted({t for t in (tokenizer.eos_token_id, model.config.eos_token_id)
                  if isinstance(t, int)})

    generator = torch.Generator().manual_seed(params.seed)
    edits = {"edit": [], "null": []}
    for path in paths:
        meta = directions.layers[path]
        theta_p, theta_n = directions.theta(path)
        target = Target(path, meta["layer"])
        edits["edit"].append(LayerEdit(target, theta_p, theta_n, rows))
        edits["null"].append(LayerEdit(target, random_like(theta_p, generator),
                                       random_like(theta_n, generator), rows))

    def row_hook(batch: list[int]) -> None:
        if rows is not None:
            rows.index = [table_row[users[i]] for i in batch]

    def run(condition: str, scoring: str, alpha: float, beta: float, ratio: float,
            stats: EditStats | None) -> dict[str, Any]:
        context = projection_edit(model, edits[condition], alpha, beta, ratio, stats) \
            if condition in edits else contextlib.nullcontext()
        with context:
            if scoring == "gen":
                new = generate(model, prompts[condition], max_new_tokens=params.max_new_tokens,
                               batch_size=params.batch_size, pad_id=pad, eos_ids=eos,
                               desc=f"{condition} generate", row_hook=row_hook)
                texts = [tokenizer.decode(n, skip_special_tokens=True) for n in new]
                return {"pred": [parse_tag(t, task.tags) for t in texts], "texts": texts,
                        "exact": [exact_tag(t, task.tags) != INVALID for t in texts]}
            scores = tag_logprobs(model, prompts[condition], tag_ids,
                                  batch_size=params.batch_size, pad_id=pad,
                                  desc=f"{condition} likelihood", row_hook=row_hook).numpy()
            return {"pred": [task.tags[i] for i in scores.argmax(1)],
                    "entropy": entropy(scores)}

    start = time.perf_counter()
    gold = [q.gold for q in questions]
    index = resamples(len(questions), params.bootstrap, params.seed)
    stats, null_stats = EditStats(), EditStats()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    metrics: dict[str, Any] = {}
    for scoring in SCORINGS[params.scoring]:
        for condition in CONDITIONS:
            result = run(condition, scoring, params.alpha, params.beta,
                         params.target_edit_ratio,
                         {"edit": stats, "null": null_stats}.get(condition))
            results[condition, scoring] = result
            name = f"{condition}_{scoring}"
            for key, value in bootstrap_ci(gold, result["pred"], task.tags, index).items():
                metrics[f"{name}_{key}"] = value
            if scoring == "gen":
                metrics[f"{name}_valid_tag_rate"] = \
                    sum(p != INVALID for p in result["pred"]) / len(gold)
                metrics[f"{name}_exact_tag_rate"] = sum(result["exact"]) / len(gold)
            else:
                metrics[f"{name}_entropy_mean"] = float(result["entropy"].mean())
        correct = {c: np.array([p == g for p, g in zip(results[c, scoring]["pred"], gold,
                                                       strict=True)])
                   for c in CONDITIONS}
        for other in ("no_profile", "personalized", "null"):
            for key, value in paired_bootstrap(correct["edit"], correct[other], index).items():
                metrics[f"edit_minus_{other}_{scoring}_{key}"] = value
    metrics["edit_ratio_realized"] = stats.mean_ratio
    metrics["null_ratio_realized"] = null_stats.mean_ratio
    metrics["edit_ratio_target"] = params.target_edit_ratio

    # the seed's numerical checks of the edit, on the evaluation prompts' MLP outputs
    checks = _edit_checks(model, prompts["edit"][: params.batch_size], edits["edit"],
                          params.alpha, params.beta, pad, row_hook)
    metrics.update(checks)
    metrics["theta_p_dot_theta_n"] = float(np.mean(
        [directions.layers[p]["quality"]["theta_p_dot_theta_n"] for p in paths]))

    sweep = _sweep(params, run, gold, results, metrics)
    seconds = time.perf_counter() - start
    check_unchanged(model, frozen, "eval-chameleon")

    # outputs, once everything has run
    vectors = {directions.layers[p]["layer"]: stats.mean_edit(p).numpy() for p in paths
               if directions.layers[p]["layer"] and p in stats.edit_sums}
    if vectors:
        write_control_vector(params.control_vector, vectors, str(model.config.model_type))
    write_json(params.predictions, {
        "params": as_dict(base_params, data, params), "model_id": base.info.model_id,
        "tags": list(task.tags),
        "questions": [{"id": q.id, "user": q.user, "gold": q.gold, **{
            f"{c}_{s}": results[c, s]["pred"][i] for c, s in results},
            **{f"{c}_gen_text": results[c, "gen"]["texts"][i] for c in CONDITIONS
               if (c, "gen") in results}} for i, q in enumerate(questions)]})
    write_csv(params.plot, ["alpha", "beta", "edit_accuracy", "edit_ratio", "null_accuracy",
                            "null_ratio"], sweep)
    oracle = profile_free_oracle_accuracy(questions)
    write_metrics(Path(params.metrics), {
        **frozen.as_metrics(), "weights_unchanged": True,
        "eval_users": len(questions), "tags": len(task.tags),
        "layers": ",".join(str(directions.layers[p]["layer"]) for p in paths),
        "direction_scope": directions.scope, "edit_prompt": params.edit_prompt,
        "alpha": params.alpha, "beta": params.beta,
        "majority_accuracy": majority_accuracy(questions),
        **({"profile_free_oracle_accuracy": oracle} if oracle is not None else {}),
        **{f"gold_share_{tag_key(t)}": v for t, v in class_balance(questions, task.tags).items()},
        **metrics, "control_vector_layers": len(vectors), "seconds": round(seconds, 2)})
    first = SCORINGS[params.scoring][-1]
    click.echo(f"eval-chameleon on {len(questions)} users ({first}): " + ", ".join(
        f"{c} {metrics[f'{c}_{first}_accuracy']:.3f}" for c in CONDITIONS)
        + f"; majority {majority_accuracy(questions):.3f}; realized edit ratio "
        f"{stats.mean_ratio:.4f}; {seconds:.0f}s")


def _sweep(params: EvalChameleonParams, run: Any, gold: list[str],
           results: dict[tuple[str, str], dict[str, Any]], metrics: dict[str, Any]
           ) -> list[list[Any]]:
    """Likelihood accuracy of edit and null control at each sweep alpha, with beta and the
    target edit ratio scaled by alpha/params.alpha (so both get the same edit ratio); the
    personalized prompt is alpha 0, and the main run's alpha is taken from the main results."""
    def accuracy(pred: list[str]) -> float:
        return float(np.mean([p == g for p, g in zip(pred, gold, strict=True)]))

    rows: dict[float, list[Any]] = {}
    if ("personalized", "lik") in results and params.edit_prompt == "personalized":
        acc = accuracy(results["personalized", "lik"]["pred"])
        rows[0.0] = [0.0, 0.0, acc, 0.0, acc, 0.0]
    for a in params.sweep_alphas:
        if a == params.alpha and ("edit", "lik") in results:
            continue
        scale = a / params.alpha
        row: list[Any] = [a, params.beta * scale]
        for condition in ("edit", "null"):
            stats = EditStats()
            result = run(condition, "lik", a, params.beta * scale,
                         params.target_edit_ratio * scale, stats)
            row += [accuracy(result["pred"]), stats.mean_ratio]
        rows[a] = row
    if ("edit", "lik") in results and params.sweep_alphas:
        rows[params.alpha] = [params.alpha, params.beta,
                              metrics["edit_lik_accuracy"], metrics["edit_ratio_realized"],
                              metrics["null_lik_accuracy"], metrics["null_ratio_realized"]]
    return [rows[a] for a in sorted(rows)]


@torch.inference_mode()
def _edit_checks(model: torch.nn.Module, prompts: list[list[int]], edits: list[LayerEdit],
                 alpha: float, beta: float, pad: int, row_hook: Any) -> dict[str, float]:
    """Projection parallelism (cosine of the alpha-only edit with θ_p, ideally 1) and linearity
    in alpha (relative error of edit(2α, 2β) against 2·edit(α, β), no ratio control)."""
    ids, mask, _ = left_pad(prompts, pad)
    row_hook(list(range(len(prompts))))
    with capture_outputs(model, [e.target.path for e in edits]) as store:
        model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
              use_cache=False, logits_to_keep=1)
    cosines, errors = [], []
    for layer_edit in edits:
        x = store[layer_edit.target.path][0].double()[mask.bool()]  # real tokens [N, d]
        p_hat, n_hat = (v.double() for v in layer_edit.directions(x))
        if p_hat.dim() == 2:  # per user: one direction per row
            tokens = mask.sum(1).tolist()
            p_hat = torch.cat([p_hat[i:i + 1].expand(t, -1) for i, t in enumerate(tokens)])
            n_hat = torch.cat([n_hat[i:i + 1].expand(t, -1) for i, t in enumerate(tokens)])
        only_p = edit_of(x, p_hat, n_hat, alpha, 0.0)
        cos = (only_p * p_hat).sum(-1).abs() / only_p.norm(dim=-1).clamp_min(1e-300)
        cosines.append(float(cos.mean()))
        once, twice = edit_of(x, p_hat, n_hat, alpha, beta), edit_of(x, p_hat, n_hat, 2 * alpha,
                                                                       2 * beta)
        errors.append(float((twice - 2 * once).norm() / (2 * once).norm().clamp_min(1e-300)))
    return {"check_projection_parallelism": float(np.mean(cosines)),
            "check_alpha_linearity_error": float(np.mean(errors))}
