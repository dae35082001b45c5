"""Running the frozen model in batches: generation, pooled MLP-output states, tag likelihoods
(with the layers below the first edited one run once per prompt for every edited condition).

Rows of different lengths are left-padded for generation and scoring (positions counted from
each row's first real token) and right-padded for reading states; rows are batched in order
of length so little is padding, and results come back in the caller's order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from newllm.chameleon.editing import capture_outputs
from newllm.core.hidden import decoder_of
from newllm.core.runtime import progress
from newllm.core.tokens import left_pad

POOLINGS = ("mean", "last")


def _batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length (longest first), deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def device_of(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
             batch_size: int, pad_id: int, eos_ids: list[int], do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             desc: str = "generate", row_hook: Any = None) -> list[list[int]]:
    """New token ids for each prompt (cut at the first end token, which is left out).

    `row_hook(rows)` is called before each batch with the prompt indices it holds.
    """
    device = device_of(model)
    out: list[list[int]] = [[] for _ in prompts]
    batches = list(_batches([len(p) for p in prompts], batch_size))
    for number, rows in enumerate(progress(batches, desc, unit="batch")):
        ids, mask, _ = left_pad([prompts[i] for i in rows], pad_id, device)
        if row_hook is not None:
            row_hook(rows)
        if do_sample:
            torch.manual_seed(seed * 100003 + number)  # each batch its own, repeatable stream
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
            if do_sample else {"do_sample": False, "temperature": None, "top_p": None,
                               "top_k": None}
        generated = model.generate(input_ids=ids, attention_mask=mask,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=eos_ids, **sampling)
        for row, new in zip(rows, generated[:, ids.shape[1]:].tolist(), strict=True):
            cut = next((k for k, t in enumerate(new) if t in eos_ids), len(new))
            out[row] = new[:cut]
    return out


@torch.inference_mode()
def pooled_states(model: torch.nn.Module, rows: list[tuple[list[int], list[int]]],
                  paths: list[str], *, pooling: str, batch_size: int, pad_id: int,
                  desc: str = "states") -> dict[str, torch.Tensor]:
    """Per row (context ids, generated ids): each module's output pooled over the generated
    positions (mean, or the last one) -> {path: [N, d]} in float32.

    A row whose generation is empty is pooled at its last context position instead.
    """
    device = device_of(model)
    pooled: dict[str, list[torch.Tensor | None]] = {p: [None] * len(rows) for p in paths}
    batches = list(_batches([len(c) + len(g) for c, g in rows], batch_size))
    for batch in progress(batches, desc, unit="batch"):
        seqs = [rows[i][0] + rows[i][1] for i in batch]
        length = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad_id] * (length - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs],
                            device=device)
        with capture_outputs(model, paths) as store:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        for path in paths:
            states = store[path][0].float()
            for k, i in enumerate(batch):
                start, end = len(rows[i][0]), len(rows[i][0]) + len(rows[i][1])
                if end == start:
                    start -= 1
                span = states[k, start:end]
                pooled[path][i] = (span.mean(0) if pooling == "mean" else span[-1]).cpu()
    return {p: torch.stack(v) for p, v in pooled.items()}  # type: ignore[arg-type]


def _packed_tag_rows(prompts: list[list[int]], tag_ids: list[list[int]], pad_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt (left-padded to P) followed by every tag, as ids, positions and a 4D
    attention mask [B, 1, T, T]: a tag's tokens see the prompt and their own earlier tokens,
    never another tag, and each tag's positions continue the prompt's."""
    length = max(len(p) for p in prompts)
    flat = [t for tag in tag_ids for t in tag]
    total = length + len(flat)
    spans, start = [], length
    for tag in tag_ids:
        spans.append((start, start + len(tag)))
        start += len(tag)
    block = torch.zeros(total, total, dtype=torch.bool)
    block[:length, :length] = True
    for a, b in spans:
        block[a:b, :length] = True
        block[a:b, a:b] = True
    block &= torch.ones(total, total, dtype=torch.bool).tril()
    ids = torch.full((len(prompts), total), pad_id)
    positions = torch.zeros(len(prompts), total, dtype=torch.long)
    allowed = block.repeat(len(prompts), 1, 1)
    for row, prompt in enumerate(prompts):
        pad = length - len(prompt)
        ids[row, pad:length] = torch.tensor(prompt)
        ids[row, length:] = torch.tensor(flat)
        positions[row, pad:length] = torch.arange(len(prompt))
        for (a, b), tag in zip(spans, tag_ids, strict=True):
            positions[row, a:b] = len(prompt) + torch.arange(len(tag))
        allowed[row, :, :pad] = False  # nothing attends to padding...
        allowed[row, torch.arange(pad), torch.arange(pad)] = True  # ...but itself (no NaN)
    return ids, positions, allowed[:, None]


def _tag_scores(logits: torch.Tensor, tag_ids: list[list[int]]) -> torch.Tensor:
    """Summed log p(tag | prompt) [B, K] (float64) from the kept logits [B, 1 + T, V]: position
    0 predicts every tag's first token, then come the packed tag tokens in order."""
    logp = torch.log_softmax(logits.double(), -1).cpu()
    scores = torch.zeros(logits.shape[0], len(tag_ids), dtype=torch.float64)
    offset = 1
    for k, tag in enumerate(tag_ids):
        total = logp[:, 0, tag[0]].clone()
        for j in range(1, len(tag)):
            total += logp[:, offset + j - 1, tag[j]]
        scores[:, k] = total
        offset += len(tag)
    return scores


@torch.inference_mode()
def tag_logprobs(model: torch.nn.Module, prompts: list[list[int]], tag_ids: list[list[int]],
                 *, batch_size: int, pad_id: int, desc: str = "likelihood",
                 row_hook: Any = None) -> torch.Tensor:
    """log p(tag | prompt) summed over each tag's tokens -> [N, K] (float64).

    One forward pass per batch scores every tag: the tags follow the prompt side by side,
    kept apart by the attention mask (`_packed_tag_rows`), and the LM head runs only at the
    positions that predict a tag token. `row_hook(rows)` is called before each batch with the
    prompt indices it holds (per-user edits set their directions there).
    """
    return shared_lower_scores(model, prompts, tag_ids, {}, start_layer=None,
                               batch_size=batch_size, pad_id=pad_id, desc=desc,
                               row_hook=row_hook)["base"]


@dataclass
class LayerInput:
    """What a decoder layer received in a pass: its hidden states [B, T, d] and the keyword
    arguments the decoder passed (mask, rotary position embeddings, positions)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@contextlib.contextmanager
def capture_layer_input(model: torch.nn.Module, layer: int) -> Iterator[list[LayerInput]]:
    """Record the input of decoder layer `layer` while the block runs (the hook is removed on
    the way out)."""
    found: list[LayerInput] = []

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        found.append(LayerInput(hidden, rest))

    handle = decoder_of(model).layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield found
    finally:
        handle.remove()


@torch.inference_mode()
def run_from_layer(model: torch.nn.Module, start: LayerInput, layer: int, keep: int
                   ) -> torch.Tensor:
    """The logits [B, keep, V] at the last `keep` positions of a pass resumed at decoder layer
    `layer` from its recorded input: the same modules (and hooks) as the full pass above it,
    and none below."""
    decoder = decoder_of(model)
    hidden = start.hidden
    for block in decoder.layers[layer:]:
        hidden = block(hidden, **start.kwargs)
    return model.get_output_embeddings()(decoder.norm(hidden[:, -keep:]))


@torch.inference_mode()
def shared_lower_scores(model: torch.nn.Module, prompts: list[list[int]],
                        tag_ids: list[list[int]],
                        conditions: dict[str, Callable[[], contextlib.AbstractContextManager]],
                        *, start_layer: int | None, batch_size: int, pad_id: int,
                        desc: str = "likelihood", row_hook: Any = None,
                        timing: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Tag scores [N, K] of the unedited pass ("base") and of every edited condition.

    Per batch, the unedited pass records the input of decoder layer `start_layer` (the first
    edited one); each condition (name -> a context manager factory that hooks the edit)
    resumes from there (`run_from_layer`), so the layers below it run once per prompt for all
    conditions. Every edited module must be at or above `start_layer`. `timing` (if given)
    accumulates the seconds of the unedited passes ("base") and of the resumed ones
    ("resumed", over "resumed_rows" prompt-condition pairs).
    """
    device = device_of(model)
    tag_len = sum(len(t) for t in tag_ids)
    scores = {name: torch.zeros(len(prompts), len(tag_ids), dtype=torch.float64)
              for name in ("base", *conditions)}
    for rows in progress(list(_batches([len(p) for p in prompts], batch_size)), desc,
                         unit="batch"):
        if row_hook is not None:
            row_hook(rows)
        ids, positions, allowed = _packed_tag_rows([prompts[i] for i in rows], tag_ids, pad_id)
        inputs = {"input_ids": ids.to(device), "attention_mask": allowed.to(device),
                  "position_ids": positions.to(device), "use_cache": False,
                  "logits_to_keep": tag_len + 1}
        if start_layer is None:
            scores["base"][rows] = _tag_scores(model(**inputs).logits, tag_ids)
            continue
        clock = time.perf_counter()
        with capture_layer_input(model, start_layer) as found:
            scores["base"][rows] = _tag_scores(model(**inputs).logits, tag_ids)
        resumed = time.perf_counter()
        for name, context in conditions.items():
            with context():
                logits = run_from_layer(model, found[0], start_layer, tag_len + 1)
            scores[name][rows] = _tag_scores(logits, tag_ids)
        if timing is not None:
            timing["base"] += resumed - clock
            timing["resumed"] += time.perf_counter() - resumed
            timing["resumed_rows"] += len(rows) * len(conditions)
    return scores
