"""self-generate: per user, what the frozen model writes from a personalized prompt (profile
in it) and from a neutral, profile-free prompt; cached as token ids for estimate-directions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from newllm.chameleon import GENERATIONS_KIND
from newllm.chameleon.data import class_balance, majority_accuracy, tag_key
from newllm.chameleon.lm import generate
from newllm.chameleon.params import ChameleonDataParams
from newllm.chameleon.prompts import (
    NEUTRAL_TEMPLATE,
    PERSONALIZED_TEMPLATE,
    as_model_input,
    check_template,
    fill,
)
from newllm.chameleon.scoring import names_a_tag
from newllm.core.artifacts import save_artifact, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.params import as_dict, param
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
    seed: int = param(0, "Seed of the sampling.", min=0)
    batch_size: int = param(8, "Prompts per generation batch.", min=1)
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
                    "prompt; save the prompts' and generations' token ids and texts, and "
                    "report the label-leak check (neutral generations that name no tag).")
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

    users = [q.user for q in questions]
    save_artifact(params.out, tensors, kind=GENERATIONS_KIND, stage="self-generate",
                  params=as_dict(base_params, data, params), base=base.info.as_dict(),
                  extra={"users": users, "direction_users": [q.user for q in split.direction],
                         "texts": generated_texts, "task": task.source,
                         "tags": list(task.tags)})
    leak = [names_a_tag(t, task.tags) for t in generated_texts["neutral"]]
    leak_gold = [names_a_tag(t, (q.gold,)) for t, q in zip(generated_texts["neutral"], questions,
                                                          strict=True)]
    mentions = [names_a_tag(t, task.tags) for t in generated_texts["personalized"]]
    lengths = [int(n) for n in tensors["personalized.gen_offsets"].diff().tolist()
               + tensors["neutral.gen_offsets"].diff().tolist()]
    metrics = {
        **frozen.as_metrics(), "weights_unchanged": True,
        "users": len(users), "direction_users": len(split.direction),
        "task_users": len(task.questions), "tags": len(task.tags),
        "generations": 2 * len(users), "gen_tokens_mean": sum(lengths) / len(lengths),
        "empty_generations": sum(n == 0 for n in lengths),
        "neutral_clean_share": 1 - sum(leak) / len(leak),
        "neutral_names_gold_share": sum(leak_gold) / len(leak_gold),
        "personalized_names_tag_share": sum(mentions) / len(mentions),
        "direction_majority_accuracy": majority_accuracy(split.direction),
        **{f"direction_gold_share_{tag_key(t)}": v
           for t, v in class_balance(split.direction, task.tags).items()},
        "seconds": round(seconds, 2),
    }
    write_metrics(Path(params.metrics), metrics)
    click.echo(f"self-generate: {len(users)} users x 2 prompts, {metrics['gen_tokens_mean']:.1f} "
               f"tokens per generation, neutral generations naming no tag "
               f"{metrics['neutral_clean_share']:.0%}, {seconds:.1f}s")
