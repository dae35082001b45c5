"""self-generate: per user, what the frozen model writes from a personalized prompt (profile
in it) and from a neutral, profile-free prompt; cached as token ids for estimate-directions,
with the mismatched-profile prompts (each direction user's question with another direction
user's profile) that the stronger null control reads the same generations after."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.chameleon import GENERATIONS_KIND
from newllm.chameleon.data import Question, candidates, class_balance, majority_accuracy, tag_key
from newllm.chameleon.lm import generate
from newllm.chameleon.params import ChameleonDataParams
from newllm.chameleon.prompts import (
    NEUTRAL_TEMPLATE,
    PERSONALIZED_TEMPLATE,
    as_model_input,
    check_template,
    fill,
)
from newllm.chameleon.scoring import leak_figures, names_a_tag
from newllm.core.artifacts import save_artifact, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.params import as_dict, param
from newllm.core.stats import derangement
from newllm.core.tokens import pad_token_id


@dataclass
class SelfGenerateParams:
    group = "self_generate"
    personalized_template: str = param(PERSONALIZED_TEMPLATE, "Personalized prompt: "
                                       "{profile} and {question} are filled in.")
    neutral_template: str = param(NEUTRAL_TEMPLATE, "Neutral, profile-free prompt: {question} "
                                  "is filled in.")
    users: str = param("direction", "Whose generations: the direction users, or all (direction "
                       "and evaluation users; per_user directions need the latter).",
                       choices=("direction", "all"))
    max_new_tokens: int = param(16, "Tokens generated per prompt.", min=1)
    do_sample: bool = param(False, "Sample (seeded) instead of greedy decoding.")
    temperature: float = param(0.7, "Sampling temperature (do_sample only).", min=1e-6)
    top_p: float = param(0.9, "Nucleus sampling mass (do_sample only).", min=1e-6, max=1.0)
    seed: int = param(0, "Seed of the sampling and of the mismatched-profile pairing.", min=0)
    max_leak: float = param(0.1, "Fail if neutral generations name a genre more often when it "
                            "is the gold than when it is another listed candidate, by more "
                            "than this share (leak_within_genre; 1 = no gate).", min=0, max=1)
    batch_size: int = param(16, "Prompts per generation batch.", min=1)
    out: str = param("artifacts/chameleon/generations.safetensors", "Output artifact.",
                     output="artifact")
    metrics: str = param("metrics/chameleon/self_generate.json", "Metrics file.", output="metrics")


def _flat(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([t for r in rows for t in r], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(r) for r in rows], dtype=torch.int64).cumsum(0)
    return ids, offsets


@stage_command("self-generate", BaseParams, ChameleonDataParams, SelfGenerateParams,
               help="For each direction user, generate with the frozen base from a "
                    "personalized prompt (profile included) and a neutral, profile-free "
                    "prompt; save the prompts' and generations' token ids and texts and the "
                    "mismatched-profile prompts, and gate on the label-leak check (neutral "
                    "generations naming the gold more often than the other listed genres).")
def self_generate(base_params: BaseParams, data: ChameleonDataParams,
                  params: SelfGenerateParams) -> None:
    check_template(params.personalized_template, "self_generate.personalized_template",
                   needs_profile=True)
    check_template(params.neutral_template, "self_generate.neutral_template",
                   needs_profile=False)
    task = data.task()
    split = data.split(task)
    questions = split.direction + (split.evaluation if params.users == "all" else ())
    texts = {"personalized": [fill(params.personalized_template, q,
                                   "self_generate.personalized_template") for q in questions],
             "neutral": [fill(params.neutral_template, q, "self_generate.neutral_template")
                         for q in questions]}
    if len(split.direction) < 2:
        raise NewllmError("chameleon_data.num_direction_users must be at least 2: the "
                          "mismatched-profile null pairs each direction user with another.")
    # the mismatched-profile null: user i's question (and generation) with user σ(i)'s profile
    profile_of = derangement(len(split.direction), params.seed)
    mismatched = [fill(params.personalized_template,
                       Question(q.id, q.user, q.input, split.direction[j].profile, q.gold,
                                q.item_key), "self_generate.personalized_template")
                  for q, j in zip(split.direction, profile_of, strict=True)]
    base = base_params.load()
    frozen = freeze(base.model)
    tokenizer = base.tokenizer
    pad = pad_token_id(tokenizer, base.model)
    eos = sorted({t for t in (tokenizer.eos_token_id, base.model.config.eos_token_id)
                  if isinstance(t, int)})
    start = time.perf_counter()
    tensors, generated_texts = {}, {}
    for kind, rows in texts.items():
        prompts = [tokenizer(as_model_input(tokenizer, t, data.chat_template),
                             add_special_tokens=False)["input_ids"] for t in rows]
        new = generate(base.model, prompts, max_new_tokens=params.max_new_tokens,
                       batch_size=params.batch_size, pad_id=pad, eos_ids=eos,
                       do_sample=params.do_sample, temperature=params.temperature,
                       top_p=params.top_p, seed=params.seed, desc=f"self-generate {kind}")
        tensors[f"{kind}.prompt_ids"], tensors[f"{kind}.prompt_offsets"] = _flat(prompts)
        tensors[f"{kind}.gen_ids"], tensors[f"{kind}.gen_offsets"] = _flat(new)
        generated_texts[kind] = [tokenizer.decode(n, skip_special_tokens=True) for n in new]
    seconds = time.perf_counter() - start
    check_unchanged(base.model, frozen, "self-generate")
    tensors["mismatched.prompt_ids"], tensors["mismatched.prompt_offsets"] = _flat(
        [tokenizer(as_model_input(tokenizer, t, data.chat_template),
                   add_special_tokens=False)["input_ids"] for t in mismatched])

    users = [q.user for q in questions]
    leak = leak_figures(generated_texts["neutral"], [q.gold for q in questions],
                        [candidates(q, task.tags) for q in questions])
    if leak.get("leak_within_genre", 0.0) > params.max_leak:
        raise NewllmError(
            f"self-generate: the neutral generations name a genre "
            f"{leak['leak_within_genre']:.3f} more often when it is the gold than when it is "
            f"another listed candidate (> self_generate.max_leak {params.max_leak}); the "
            "neutral prompt leaks the label.")
    save_artifact(params.out, tensors, kind=GENERATIONS_KIND, stage="self-generate",
                  params=as_dict(base_params, data, params), base=base.info.as_dict(),
                  extra={"users": users, "direction_users": [q.user for q in split.direction],
                         "mismatched_profile_of": [split.direction[j].user for j in profile_of],
                         "texts": generated_texts, "task": task.source,
                         "tags": list(task.tags)})
    mentions = [names_a_tag(t, task.tags) for t in generated_texts["personalized"]]
    lengths = [int(n) for n in tensors["personalized.gen_offsets"].diff().tolist()
               + tensors["neutral.gen_offsets"].diff().tolist()]
    metrics = {
        **frozen.as_metrics(), "weights_unchanged": True,
        "users": len(users), "direction_users": len(split.direction),
        "task_users": len(task.questions), "tags": len(task.tags),
        "generations": 2 * len(users), "gen_tokens_mean": sum(lengths) / len(lengths),
        "empty_generations": sum(n == 0 for n in lengths),
        **{f"neutral_{k}": v for k, v in leak.items()}, "max_leak": params.max_leak,
        "personalized_names_tag_share": sum(mentions) / len(mentions),
        "direction_majority_accuracy": majority_accuracy(split.direction),
        **{f"direction_gold_share_{tag_key(t)}": v
           for t, v in class_balance(split.direction, task.tags).items()},
        "seconds": round(seconds, 2),
    }
    write_metrics(Path(params.metrics), metrics)
    click.echo(f"self-generate: {len(users)} users x 2 prompts, {metrics['gen_tokens_mean']:.1f} "
               f"tokens per generation; neutral generations name the gold "
               f"{leak.get('names_gold_share', 0):.0%}, another listed genre "
               f"{leak.get('names_other_candidate_share', 0):.0%} (leak "
               f"{leak.get('leak', 0):+.3f}; within genre {leak.get('leak_within_genre', 0):+.3f}"
               f"); {seconds:.1f}s")
