"""generate (a command, not a DVC stage): try projection editing on a prompt of your own.

Prints the greedy continuation of the prompt without the edit and with it, and the realized
edit ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from newllm.chameleon.directions import load_directions, select_layers
from newllm.chameleon.editing import EditStats, LayerEdit, Target, projection_edit
from newllm.chameleon.lm import generate as generate_ids
from newllm.chameleon.prompts import as_model_input
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.params import param
from newllm.core.tokens import pad_token_id


@dataclass
class GenerateParams:
    group = "generate"
    directions: str = param("artifacts/chameleon/directions.safetensors",
                            "estimate-directions output (global scope).")
    prompt: str = param("Which tag does this movie relate to among the following tags? Just "
                        "answer with the tag name. tags: [Action, Comedy, Drama, Romance, "
                        "Thriller] description: Sleepless in Seattle (1993); genres: Comedy, "
                        "Romance", "Prompt to continue.")
    layers: list[int | str] | None = param(None, "Layers to edit: null = all of the "  # noqa: RUF009
                                           "directions' layers, or a subset of them (decoder "
                                           "layer indices or module paths).")
    alpha: float = param(0.6, "Weight of the personal projection (added).")
    beta: float = param(0.4, "Weight of the neutral projection (|beta| is subtracted).")
    target_edit_ratio: float = param(0.025, "Rescale each token's edit to this share of the "
                                     "MLP output's norm (0 = no control).", min=0)
    max_new_tokens: int = param(32, "Tokens to generate.", min=1)
    chat_template: bool = param(True, "Give the prompt as a chat user turn when the tokenizer "
                                "has a chat template.")


@stage_command("generate", BaseParams, GenerateParams,
               help="Generate from a prompt with and without projection editing of the chosen "
                    "MLP outputs (alpha·proj_p − |beta|·proj_n) and print both. A command, not "
                    "a DVC stage.")
def generate(base_params: BaseParams, params: GenerateParams) -> None:
    if not params.prompt.strip():
        raise NewllmError("generate.prompt is empty; give some text.")
    base = base_params.load()
    directions = load_directions(params.directions, base.info.as_dict())
    if directions.scope != "global":
        raise NewllmError(f"{params.directions} holds per-user directions; generate needs "
                          "global ones (estimate_directions.direction_scope: global).")
    paths = select_layers(directions, params.layers, "generate.layers")
    frozen = freeze(base.model)
    tokenizer = base.tokenizer
    ids = tokenizer(as_model_input(tokenizer, params.prompt, params.chat_template),
                    add_special_tokens=False)["input_ids"]
    eos = sorted({t for t in (tokenizer.eos_token_id, base.model.config.eos_token_id)
                  if isinstance(t, int)})
    edits = [LayerEdit(Target(p, directions.layers[p]["layer"]), *directions.theta(p))
             for p in paths]
    options = {"max_new_tokens": params.max_new_tokens, "batch_size": 1,
               "pad_id": pad_token_id(tokenizer, base.model), "eos_ids": eos}
    plain = generate_ids(base.model, [ids], **options)[0]
    stats = EditStats()
    with projection_edit(base.model, edits, params.alpha, params.beta, params.target_edit_ratio,
                         stats):
        edited = generate_ids(base.model, [ids], **options)[0]
    check_unchanged(base.model, frozen, "generate")
    layers = ", ".join(str(directions.layers[p]["layer"]) for p in paths)
    click.echo(f"layers {layers}; alpha {params.alpha}, beta {params.beta}, target edit ratio "
               f"{params.target_edit_ratio}; realized edit ratio {stats.mean_ratio:.4f}")
    click.echo(f"[without edit] {tokenizer.decode(plain, skip_special_tokens=True)!r}")
    click.echo(f"[with edit] {tokenizer.decode(edited, skip_special_tokens=True)!r}")
