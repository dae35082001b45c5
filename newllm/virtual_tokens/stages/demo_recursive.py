"""demo-recursive (a command, not a DVC stage): an old text as one vector before a prompt.

Prints three greedy continuations of the prompt side by side: without the
vector, with the vector (`[BOS, v, prompt]`), and with the whole old text
(`[BOS, old text, prompt]`), plus the vocabulary tokens nearest the vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import torch

from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.core.tokens import pad_token_id
from newllm.virtual_tokens.converter import load_converter
from newllm.virtual_tokens.recovery import nearest_tokens
from newllm.virtual_tokens.recursive import (
    POOLS,
    embed_ids,
    generate_from_rows,
    pool_hidden,
)


@dataclass
class DemoRecursiveParams:
    group = "demo_recursive"
    converter: str = param("artifacts/converters/layer30_linear/converter.safetensors",
                           "Converter made by train-converter.")
    compress_text: str = param(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889.", "Old text to compress into one vector.")
    prompt: str = param("The tower was built by the company of", "Prompt that follows it.")
    max_new_tokens: int = param(24, "Tokens to generate for each variant.", min=1)
    pool: str = param("mean", "How to pool the old text's hidden states.", choices=POOLS)


@stage_command("demo-recursive", BaseParams, DemoRecursiveParams,
               help="Compress an old text into one token-like vector (pool its hidden states at "
                    "the converter's layer, convert), prepend it to a prompt via inputs_embeds, "
                    "and generate; prints the output without the vector, with it, and with the "
                    "full old text. A demo command, not a DVC stage.")
def demo_recursive(base_params: BaseParams, params: DemoRecursiveParams) -> None:
    for key in ("compress_text", "prompt"):
        if not getattr(params, key).strip():
            raise NewllmError(f"demo_recursive.{key} is empty; give it some text.")
    base = base_params.load()
    converter, artifact = load_converter(params.converter, base.info.as_dict(), base.device)
    # The vector goes where its training pairs put the token: after their prefix token.
    layer, prefix_id = (artifact.meta["extra"]["layer_index"],
                        artifact.meta["extra"]["prefix_token_id"])
    model, tokenizer = base.model, base.tokenizer
    old_ids = tokenizer(params.compress_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(params.prompt, add_special_tokens=False)["input_ids"]

    pooled = pool_hidden(model, torch.tensor(old_ids), layer, prefix_id, params.pool)
    vector = converter(pooled.float()).to(model.dtype)
    prefix = [prefix_id] if prefix_id is not None else []
    rows = {
        "without vector": embed_ids(model, prefix + prompt_ids),
        "with vector": torch.cat([embed_ids(model, prefix), vector[None],
                                  embed_ids(model, prompt_ids)]),
        "with full old text": embed_ids(model, prefix + old_ids + prompt_ids),
    }
    continuations = generate_from_rows(model, list(rows.values()),
                                       pad_token_id(tokenizer, model),
                                       tokenizer.eos_token_id, params.max_new_tokens)
    ids, sims = nearest_tokens(vector[None].float(),
                               model.get_input_embeddings().weight.float(), 5)
    near = ", ".join(f"{tokenizer.decode([i])!r} {s:.2f}"
                     for i, s in zip(ids[0].tolist(), sims[0].tolist(), strict=True))
    click.echo(f"converter: layer {layer} {converter.config.model_type} ({artifact.path}); "
               f"old text: {len(old_ids)} tokens pooled by {params.pool} into 1 vector")
    click.echo(f"nearest tokens to the vector: {near}")
    click.echo(f"prompt: {params.prompt!r}")
    for (name, _), continuation in zip(rows.items(), continuations, strict=True):
        click.echo(f"[{name}] {tokenizer.decode(continuation)!r}")

