"""eval-chameleon: does projection editing personalize, by how much, and would a random or a
mismatched-profile direction do the same? Tag accuracy and macro-F1 on the evaluation users
under three likelihood views (see `scoring`), the edit's rank among a null distribution of
random directions, paired bootstrap differences, the baselines that bound the task, checks of
the edit that can fail, and generation scoring on a subset."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from newllm.chameleon.checks import edit_checks, failed_checks
from newllm.chameleon.data import (
    Question,
    candidates,
    class_balance,
    majority_accuracy,
    profile_free_oracle_accuracy,
    profile_rule,
    random_listed_accuracy,
    tag_key,
)
from newllm.chameleon.directions import load_directions, random_like, select_layers
from newllm.chameleon.editing import EditStats, LayerEdit, RowSelect, Target, projection_edit
from newllm.chameleon.export import write_control_vector
from newllm.chameleon.lm import generate, shared_lower_scores, tag_logprobs
from newllm.chameleon.params import ChameleonDataParams
from newllm.chameleon.prompts import CONDITION_PROMPTS, answer_prefix, as_model_input, fill
from newllm.chameleon.scoring import (
    INVALID,
    VIEWS,
    bootstrap_ci,
    correct_of,
    exact_tag,
    macro_f1,
    null_distribution,
    paired_difference,
    parse_tag,
    view_predictions,
)
from newllm.core.artifacts import write_csv, write_json, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.params import as_dict, param
from newllm.core.tokens import pad_token_id

# scored on every evaluation user (mismatched when the directions have it); the null draws
# on the null subset; generation on the generation subset
CONDITIONS = ("no_profile", "personalized", "edit", "mismatched")
GEN_CONDITIONS = ("no_profile", "personalized", "edit", "null")
CHECK_PROMPTS = 4  # evaluation prompts the edit's checks run on (six passes each)


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
    edit_prompt: str = param("personalized", "Prompt the edit and the null controls are "
                             "applied to.", choices=("personalized", "no_profile"))
    null_draws: int = param(19, "Random-direction draws of the null distribution (same norms, "
                            "alpha, beta and edit ratio; 19 lets p reach 0.05).", min=1)
    null_users: int = param(100, "Evaluation users (a seeded subset) the null draws and the "
                            "alpha sweep run on; 0 = all.", min=0)
    gen_users: int = param(8, "Evaluation users (the first of the null subset) also scored "
                           "by generation; 0 = none.", min=0)
    max_new_tokens: int = param(10, "Tokens generated per answer (generation scoring).", min=1)
    batch_size: int = param(8, "Prompts per batch.", min=1)
    bootstrap: int = param(2000, "Bootstrap resamples for the intervals.", min=10)
    # param() gives a list default a default_factory, so instances never share it
    sweep_alphas: list[float] = param([2.4], "Alphas of the accuracy-vs-alpha plot "  # noqa: RUF009
                                      "(primary view, null subset; beta and target_edit_ratio "
                                      "scaled by alpha/eval_chameleon.alpha; alpha 0 is the "
                                      "unedited prompt); [] = no sweep.")
    seed: int = param(0, "Seed of the null draws, the null subset and the bootstrap.", min=0)
    control_vector: str = param("artifacts/chameleon/control_vector.gguf", "llama.cpp "
                                "control-vector GGUF of the mean edit per layer.", output="gguf")
    predictions: str = param("artifacts/chameleon/predictions.json", "Per-question gold and "
                             "predictions, and every null draw's accuracy.", output="metrics")
    metrics: str = param("metrics/chameleon/eval.json", "Metrics file.", output="metrics")
    plot: str = param("plots/chameleon_alpha.csv", "Accuracy vs alpha (primary view), edit "
                      "and the first null draw.", output="plot")

    def check(self) -> None:
        if self.alpha == 0 and self.sweep_alphas:
            raise NewllmError("eval_chameleon.alpha is 0, so the sweep cannot scale beta with "
                              "it; set sweep_alphas to [] or alpha to a non-zero value.")


def _views_of(scores: dict[str, np.ndarray], lengths: list[int], listed: list[list[int]],
              tags: tuple[str, ...], prior: np.ndarray) -> dict[str, dict[str, list[str]]]:
    """Predicted tags of every scored condition in every view (the calibrated view of the
    no-profile condition itself is 0 everywhere, so it is left out)."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, summed in scores.items():
        out[name] = {}
        for view in VIEWS:
            if view == "calibrated" and name == "no_profile":
                continue
            index = view_predictions(summed, lengths, listed, view, prior)
            out[name][view] = [tags[i] for i in index]
    return out


@stage_command("eval-chameleon", BaseParams, ChameleonDataParams, EvalChameleonParams,
               help="On the evaluation users: tag accuracy and macro-F1 (95% bootstrap "
                    "intervals) with no profile, the personalized prompt, projection editing "
                    "and the mismatched-profile null, by likelihood over the listed genres "
                    "(primary), calibrated and over all tags; the edit's rank and p among "
                    "random-direction null draws; paired differences; the baselines; checks "
                    "of the edit that can fail; generation scoring on a subset; accuracy vs "
                    "alpha; the mean edit as a llama.cpp control vector.")
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
    layer_of = {p: directions.layers[p]["layer"] for p in paths}
    if any(layer is None for layer in layer_of.values()):
        raise NewllmError("eval_chameleon.layers: every edited module must be a decoder "
                          "layer's (the conditions share the layers below the first one).")
    first_layer = min(layer_of.values())

    model, tokenizer = base.model, base.tokenizer
    frozen = freeze(model)
    chat = data.chat_template
    prompts = {name: [tokenizer(as_model_input(tokenizer, fill(template, q, name), chat),
                                add_special_tokens=False)["input_ids"] for q in questions]
               for name, template in CONDITION_PROMPTS.items()}
    other_prompt = "no_profile" if params.edit_prompt == "personalized" else "personalized"
    prefix = answer_prefix(tokenizer, chat)
    tag_ids = [tokenizer(prefix + t, add_special_tokens=False)["input_ids"] for t in task.tags]
    lengths = [len(t) for t in tag_ids]
    listed = [[task.tags.index(c) for c in candidates(q, task.tags)] for q in questions]
    pad = pad_token_id(tokenizer, model)
    eos = sorted({t for t in (tokenizer.eos_token_id, model.config.eos_token_id)
                  if isinstance(t, int)})

    # the edits: estimated, mismatched-profile, and the random null draws (same norms)
    generator = torch.Generator().manual_seed(params.seed)
    targets = [Target(p, layer_of[p]) for p in paths]
    edits: dict[str, list[LayerEdit]] = {
        "edit": [LayerEdit(t, *directions.theta(t.path), rows) for t in targets]}
    if directions.has_mismatched:
        edits["mismatched"] = [LayerEdit(t, *directions.theta(t.path, mismatched=True), rows)
                               for t in targets]
    nulls = [f"null_{k}" for k in range(params.null_draws)]
    for name in nulls:
        edits[name] = [LayerEdit(e.target, random_like(e.theta_p, generator),
                                 random_like(e.theta_n, generator), rows)
                       for e in edits["edit"]]

    def hook_for(index: list[int]) -> Callable[[list[int]], None]:
        """A row hook for prompts `index` (positions in `questions`) of one call."""
        def row_hook(batch: list[int]) -> None:
            if rows is not None:
                rows.index = [table_row[users[index[i]]] for i in batch]
        return row_hook

    start = time.perf_counter()
    # checks that can fail, on one batch, before any figure is computed
    check_rows = list(range(min(CHECK_PROMPTS, len(questions))))
    checks = edit_checks(model, [prompts[params.edit_prompt][i] for i in check_rows],
                         edits["edit"], params.alpha, params.beta, params.target_edit_ratio,
                         pad, hook_for(check_rows))
    failed = failed_checks(checks, params.alpha)
    if failed:
        raise NewllmError(f"eval-chameleon: the edit's checks failed ({'; '.join(failed)}); "
                          "the hooks do not apply the edit they should.")
    seconds_checks = time.perf_counter() - start

    count = len(questions) if params.null_users == 0 else min(params.null_users, len(questions))
    subset = sorted(random.Random(params.seed).sample(range(len(questions)), count))
    rest = [i for i in range(len(questions)) if i not in set(subset)]
    stats, null_stats = EditStats(), EditStats()

    def edit_context(name: str, alpha: float, beta: float, ratio: float,
                     record: EditStats | None = None) -> Callable[[], Any]:
        return lambda: projection_edit(model, edits[name], alpha, beta, ratio, record)

    main = {"edit": edit_context("edit", params.alpha, params.beta, params.target_edit_ratio,
                                 stats)}
    if "mismatched" in edits:
        main["mismatched"] = edit_context("mismatched", params.alpha, params.beta,
                                          params.target_edit_ratio)
    on_subset = dict(main)
    for k, name in enumerate(nulls):
        on_subset[name] = edit_context(name, params.alpha, params.beta,
                                       params.target_edit_ratio, null_stats if k == 0 else None)
    for a in params.sweep_alphas:
        scale = a / params.alpha
        for name in ("edit", nulls[0]):
            on_subset[f"sweep{a}_{name}"] = edit_context(
                name, a, params.beta * scale, params.target_edit_ratio * scale)

    timing: dict[str, float] = {"base": 0.0, "resumed": 0.0, "resumed_rows": 0}
    scores: dict[str, np.ndarray] = {}
    for index, conditions, desc in ((subset, on_subset, "null subset"), (rest, main, "rest")):
        if not index:
            continue
        found = shared_lower_scores(model, [prompts[params.edit_prompt][i] for i in index],
                                    tag_ids, conditions, start_layer=first_layer,
                                    batch_size=params.batch_size, pad_id=pad,
                                    desc=f"likelihood, {desc}", row_hook=hook_for(index),
                                    timing=timing)
        for name, value in found.items():
            key = params.edit_prompt if name == "base" else name
            scores.setdefault(key, np.full((len(questions), len(task.tags)), np.nan))
            scores[key][index] = value.numpy()
    seconds_likelihood_edited = time.perf_counter() - start - seconds_checks
    t0 = time.perf_counter()
    scores[other_prompt] = tag_logprobs(model, prompts[other_prompt], tag_ids,
                                        batch_size=params.batch_size, pad_id=pad,
                                        desc=f"likelihood, {other_prompt}").numpy()
    seconds_other = time.perf_counter() - t0

    gold = [q.gold for q in questions]
    prior = scores["no_profile"]
    everyone = [c for c in CONDITIONS if c in scores]
    pred = _views_of({c: scores[c] for c in everyone}, lengths, listed, task.tags, prior)
    metrics: dict[str, Any] = {}
    for condition in everyone:
        for view, predicted in pred[condition].items():
            for key, value in bootstrap_ci(gold, predicted, task.tags, params.bootstrap,
                                           params.seed).items():
                metrics[f"{condition}_{view}_{key}"] = value
    for view in VIEWS:
        correct = {c: correct_of(gold, pred[c][view]) for c in everyone if view in pred[c]}
        for other in ("no_profile", "personalized", "mismatched"):
            if other in correct:  # the edit's own prompt too: that is what the edit adds
                for key, value in paired_difference(correct["edit"], correct[other],
                                                    params.bootstrap, params.seed).items():
                    metrics[f"edit_minus_{other}_{view}_{key}"] = value

    # the null distribution on the subset: the edit's rank among the draws
    sub_gold = [gold[i] for i in subset]
    sub_listed = [listed[i] for i in subset]
    sub_prior = prior[subset]
    sub_pred = _views_of({name: scores[name][subset] for name in ("edit", *nulls)}, lengths,
                         sub_listed, task.tags, sub_prior)
    null_table: dict[str, dict[str, list[float]]] = {}
    for view in VIEWS:
        figures, null_table[view] = null_distribution(
            sub_gold, sub_pred["edit"][view], [sub_pred[n][view] for n in nulls], task.tags,
            params.bootstrap, params.seed, view)
        metrics.update(figures)
    metrics["null_draws"] = params.null_draws
    metrics["null_users"] = len(subset)
    metrics["edit_ratio_realized"] = stats.mean_ratio
    metrics["null_ratio_realized"] = null_stats.mean_ratio

    # generation scoring on the first users of the null subset
    t0 = time.perf_counter()
    gen_index = subset[: params.gen_users]
    gen_results: dict[str, dict[str, list[Any]]] = {}
    if gen_index:
        gen_edits = {"edit": edits["edit"], "null": edits[nulls[0]]}
        for condition in GEN_CONDITIONS:
            prompt_of = params.edit_prompt if condition in gen_edits else condition
            context = edit_context("edit" if condition == "edit" else nulls[0], params.alpha,
                                   params.beta, params.target_edit_ratio) \
                if condition in gen_edits else None
            with context() if context else contextlib.nullcontext():
                new = generate(model, [prompts[prompt_of][i] for i in gen_index],
                               max_new_tokens=params.max_new_tokens,
                               batch_size=params.batch_size, pad_id=pad, eos_ids=eos,
                               desc=f"{condition} generate", row_hook=hook_for(gen_index))
            texts = [tokenizer.decode(n, skip_special_tokens=True) for n in new]
            answers = [parse_tag(t, task.tags) for t in texts]
            gen_results[condition] = {"texts": texts, "pred": answers}
            gen_gold = [gold[i] for i in gen_index]
            for key, value in bootstrap_ci(gen_gold, answers, task.tags, params.bootstrap,
                                           params.seed).items():
                metrics[f"{condition}_gen_{key}"] = value
            metrics[f"{condition}_gen_valid_tag_rate"] = \
                sum(a != INVALID for a in answers) / len(answers)
            metrics[f"{condition}_gen_exact_tag_rate"] = \
                sum(exact_tag(t, task.tags) != INVALID for t in texts) / len(texts)
    metrics["gen_users"] = len(gen_index)
    seconds_generation = time.perf_counter() - t0

    sweep = _sweep(params, scores, subset, sub_gold, sub_listed, sub_prior, lengths, task.tags,
                   nulls[0])
    seconds = time.perf_counter() - start
    check_unchanged(model, frozen, "eval-chameleon")

    # outputs, once everything has run
    vectors = {layer_of[p]: stats.mean_edit(p).numpy() for p in paths
               if layer_of[p] and p in stats.edit_sums}
    if vectors:
        write_control_vector(params.control_vector, vectors, str(model.config.model_type))
    in_subset = set(subset)
    write_json(params.predictions, {
        "params": as_dict(base_params, data, params), "model_id": base.info.model_id,
        "tags": list(task.tags), "null_draws": null_table,
        "questions": [{
            "id": q.id, "user": q.user, "gold": q.gold,
            "candidates": list(candidates(q, task.tags)), "null_subset": i in in_subset,
            **{f"{c}_{v}": pred[c][v][i] for c in everyone for v in pred[c]},
            **{f"{c}_gen": gen_results[c]["pred"][gen_index.index(i)]
               for c in gen_results if i in gen_index},
            **{f"{c}_gen_text": gen_results[c]["texts"][gen_index.index(i)]
               for c in gen_results if i in gen_index}}
            for i, q in enumerate(questions)]})
    write_csv(params.plot, ["alpha", "beta", "edit_accuracy", "null_accuracy"], sweep)
    oracle = profile_free_oracle_accuracy(questions)
    rule = [profile_rule(q, task.tags) for q in questions]
    majority = max(set(gold), key=lambda t: (gold.count(t), t))
    per_user = len(questions)
    write_metrics(Path(params.metrics), {
        **frozen.as_metrics(), "weights_unchanged": True,
        "eval_users": len(questions), "tags": len(task.tags),
        "candidates_mean": float(np.mean([len(c) for c in listed])),
        "layers": ",".join(str(layer_of[p]) for p in paths),
        "direction_scope": directions.scope, "edit_prompt": params.edit_prompt,
        "alpha": params.alpha, "beta": params.beta,
        "edit_ratio_target": params.target_edit_ratio,
        "majority_accuracy": majority_accuracy(questions),
        "majority_macro_f1": macro_f1(gold, [majority] * len(gold), task.tags),
        "random_listed_accuracy": random_listed_accuracy(questions, task.tags),
        "random_listed_macro_f1": _random_listed_macro_f1(questions, task.tags, params.seed),
        "profile_rule_accuracy": float(correct_of(gold, rule).mean()),
        "profile_rule_macro_f1": macro_f1(gold, rule, task.tags),
        **({"profile_free_oracle_accuracy": oracle} if oracle is not None else {}),
        **{f"gold_share_{tag_key(t)}": v for t, v in class_balance(questions, task.tags).items()},
        **checks, **metrics, "control_vector_layers": len(vectors),
        "seconds": round(seconds, 2), "seconds_checks": round(seconds_checks, 2),
        "seconds_likelihood_edited_prompt": round(seconds_likelihood_edited, 2),
        "seconds_likelihood_other_prompt": round(seconds_other, 2),
        "seconds_generation": round(seconds_generation, 2),
        "seconds_per_user_unedited_pass": round(timing["base"] / per_user, 4),
        "seconds_per_user_resumed_pass": round(
            timing["resumed"] / max(timing["resumed_rows"], 1), 4)})
    click.echo(f"eval-chameleon on {len(questions)} users (listed genres): " + ", ".join(
        f"{c} {metrics[f'{c}_listed_accuracy']:.3f}" for c in everyone)
        + f"; null {metrics['null_listed_accuracy_mean']:.3f} ± "
        f"{metrics['null_listed_accuracy_sd']:.3f} over {params.null_draws} draws on "
        f"{len(subset)} users (edit rank {metrics['edit_null_rank_listed']}, p "
        f"{metrics['edit_null_p_listed']:.3f}); majority {majority_accuracy(questions):.3f}; "
        f"{seconds:.0f}s")


def _random_listed_macro_f1(questions: tuple[Question, ...], tags: tuple[str, ...],
                            seed: int, draws: int = 200) -> float:
    """Mean macro-F1 of answering a random listed candidate, over seeded draws."""
    rng = random.Random(seed)
    gold = [q.gold for q in questions]
    options = [candidates(q, tags) for q in questions]
    return float(np.mean([macro_f1(gold, [rng.choice(o) for o in options], tags)
                          for _ in range(draws)]))


def _sweep(params: EvalChameleonParams, scores: dict[str, np.ndarray], subset: list[int],
           gold: list[str], listed: list[list[int]], prior: np.ndarray, lengths: list[int],
           tags: tuple[str, ...], null: str) -> list[list[Any]]:
    """Primary-view accuracy on the null subset of the edit and the first null draw at each
    alpha (the run's own, and the sweep's with beta and ratio scaled by alpha/params.alpha);
    alpha 0 is the unedited prompt."""
    def accuracy(name: str) -> float:
        index = view_predictions(scores[name][subset], lengths, listed, "listed", prior)
        return float(correct_of(gold, [tags[i] for i in index]).mean())

    rows = {0.0: [0.0, 0.0, accuracy(params.edit_prompt), accuracy(params.edit_prompt)],
            params.alpha: [params.alpha, params.beta, accuracy("edit"), accuracy(null)]}
    for a in params.sweep_alphas:
        rows[a] = [a, params.beta * a / params.alpha, accuracy(f"sweep{a}_edit"),
                   accuracy(f"sweep{a}_{null}")]
    return [rows[a] for a in sorted(rows)]
