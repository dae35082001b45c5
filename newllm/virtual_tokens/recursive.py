"""Recursive compression (seeds/002 §5): an old text as one token-like vector before a prompt.

The old text's hidden states at the converter's layer are pooled (mean or last
position) and converted to one vector in input-embedding space. It is placed
where a token would be, right after the separator token as in the training pairs
(when they were read after one), and the prompt follows: `[sep, v, prompt...]`
goes to the model as `inputs_embeds`.
Rows of different lengths are left-padded (pad embeddings, attention mask 0,
positions counted from each row's first real token) and generated together.
"""

from __future__ import annotations

import torch

from newllm.core.hidden import hidden_states_at
from newllm.core.tokens import left_pad

POOLS = ("mean", "last")


@torch.inference_mode()
def pool_hidden(model: torch.nn.Module, text_ids: torch.Tensor, layer: int,
                prefix_id: int | None, pool: str) -> torch.Tensor:
    """One vector [d]: the text's hidden states at `layer`, pooled over its own tokens.

    The prefix token (when used) is read but left out of the pool: its hidden state is an
    attention sink, orders of magnitude larger than a text token's, and would swamp a mean.
    """
    device = model.get_input_embeddings().weight.device
    ids = text_ids.long().to(device)
    if prefix_id is not None:
        ids = torch.cat([torch.tensor([prefix_id], device=device), ids])
    hidden = hidden_states_at(model, ids[None], torch.ones_like(ids)[None], layer)[0]
    text_states = hidden[1:] if prefix_id is not None else hidden
    return text_states.mean(dim=0) if pool == "mean" else text_states[-1]


def embed_ids(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Input embeddings [T, d] of token ids."""
    weight = model.get_input_embeddings().weight
    return model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long,
                                                     device=weight.device))


@torch.inference_mode()
def generate_from_rows(model: torch.nn.Module, rows: list[torch.Tensor], pad_id: int,
                       eos_id: int | None, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each row of input embeddings, generated as one padded batch."""
    embeds, mask, _ = left_pad(rows, embed_ids(model, [pad_id])[0])
    # generate() derives position ids from the attention mask itself.
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                         eos_token_id=eos_id, num_beams=1)
    continuations = []
    for row in out.tolist():  # with inputs_embeds only, generate returns just the new tokens
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        continuations.append(row)
    return continuations

