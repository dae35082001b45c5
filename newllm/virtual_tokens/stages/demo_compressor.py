"""demo-compressor (a command, not a DVC stage): a text compressed into k virtual tokens by a
trained compressor, placed before a prompt.

text -> its hidden states at the compressor's context layer (after the separator, which is
left out as in build-e-star) -> compressor -> `alpha` x vectors -> `[sep, vectors, prompt]`
-> greedy generation, printed beside the continuations without context (`[sep, prompt]`) and
with the full text (`[sep, text, prompt]`), plus the vocabulary tokens nearest each vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import torch

from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.hidden import hidden_states_at
from newllm.core.params import param
from newllm.core.tokens import pad_token_id
from newllm.virtual_tokens.compressor import load_compressor
from newllm.virtual_tokens.e_star import check_context_fits
from newllm.virtual_tokens.recovery import nearest_tokens
from newllm.virtual_tokens.recursive import embed_ids, generate_from_rows


@dataclass
class DemoCompressorParams:
    group = "demo_compressor"
    compressor: str = param("artifacts/compressors/hyper/compressor.safetensors",
                            "Compressor made by train-compressor.")
    text: str = param(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889.", "Text to compress.")
    prompt: str = param("The tower was built by the company of", "Prompt that follows it.")
    ctx_len: int = param(32, "Keep the text's first this many tokens (the compressor was "
                         "trained on build_e_star.text_tokens).", min=1)
    alpha: float = param(1.0, "Scale of the injected vectors.")
    max_new_tokens: int = param(24, "Tokens to generate for each variant.", min=1)


@stage_command("demo-compressor", BaseParams, DemoCompressorParams,
               help="Compress a text into k virtual tokens with a trained compressor, prepend "
                    "them (scaled by alpha) to a prompt and generate; prints the output "
                    "without context, with the vectors and with the full text. A demo "
                    "command, not a DVC stage.")
def demo_compressor(base_params: BaseParams, params: DemoCompressorParams) -> None:
    for key in ("text", "prompt"):
        if not getattr(params, key).strip():
            raise NewllmError(f"demo_compressor.{key} is empty; give it some text.")
    base = base_params.load()
    compressor, artifact = load_compressor(params.compressor, base.info.as_dict(), base.device)
    extra = artifact.meta["extra"]
    sep_id, layer = int(extra["separator_token_id"]), int(extra["context_layer_index"])
    model, tokenizer = base.model, base.tokenizer
    text_ids = tokenizer(params.text, add_special_tokens=False)["input_ids"][:params.ctx_len]
    prompt_ids = tokenizer(params.prompt, add_special_tokens=False)["input_ids"]
    check_context_fits(model, 1 + len(text_ids) + len(prompt_ids) + params.max_new_tokens,
                       "1 + text + prompt + max_new_tokens")
    ids = torch.tensor([[sep_id, *text_ids]], device=base.device)
    with torch.no_grad():
        hidden = hidden_states_at(model, ids, torch.ones_like(ids), layer)[:, 1:].float()
        vectors = params.alpha * compressor(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool,
                                                               device=base.device))[0]
    vectors = vectors.to(model.dtype)
    rows = {
        "no context": embed_ids(model, [sep_id, *prompt_ids]),
        f"compressed ({len(vectors)} vectors)": torch.cat([embed_ids(model, [sep_id]), vectors,
                                                           embed_ids(model, prompt_ids)]),
        "full text": embed_ids(model, [sep_id, *text_ids, *prompt_ids]),
    }
    continuations = generate_from_rows(model, list(rows.values()),
                                       pad_token_id(tokenizer, model),
                                       tokenizer.eos_token_id, params.max_new_tokens)
    ids_near, sims = nearest_tokens(vectors.float(), model.get_input_embeddings().weight.float(),
                                    5)
    click.echo(f"compressor: {compressor.config.arch} ({artifact.path}); text: {len(text_ids)} "
               f"tokens -> {len(vectors)} vector(s), alpha {params.alpha}")
    for i, (row_ids, row_sims) in enumerate(zip(ids_near, sims, strict=True)):
        near = ", ".join(f"{tokenizer.decode([t])!r} {s:.2f}"
                         for t, s in zip(row_ids.tolist(), row_sims.tolist(), strict=True))
        click.echo(f"nearest tokens to vector {i}: {near}")
    click.echo(f"prompt: {params.prompt!r}")
    for name, continuation in zip(rows, continuations, strict=True):
        click.echo(f"[{name}] {tokenizer.decode(continuation)!r}")
