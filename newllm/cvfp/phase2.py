"""Phase 2: train the TokenBlock (only it) on cached contexts, next-token cross-entropy.

Example t reads the cached contexts after token t (per layer) and the embedding of token t
and predicts token t+1. The context blocks are frozen (their contexts come from the cache);
the embeddings are frozen and the head tied to them unless the config says otherwise.

Training softmax: the whole vocabulary (`shortlist: 0`) costs ~2 d V FLOPs a token for the
tied 49k-row head, most of phase 2. With `shortlist: K` the training loss is a softmax over
the K most frequent train targets plus one class "other" for the rest, whose logit is
x . w + b with w, b trained and started at the mean of the other rows and log(their count)
(the logsumexp of the other logits if they were all equal); the "other" class is dropped
after training. Evaluation always uses the full tied head over the whole vocabulary.

Context controls (`contexts`), at the same budget with the same TokenBlock: `cvfp` reads the
real contexts; `zeros` reads zeros (the TokenBlock sees only e_t: a bigram model);
`shuffled` reads the contexts of another position of the same split (a fixed derangement:
contexts of the right size and norm that say nothing about the position's past).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from newllm.core.base import state_dict_hash
from newllm.core.errors import NewllmError
from newllm.core.stats import derangement
from newllm.core.train import Epoch, TrainConfig, Trainer
from newllm.cvfp.model import CVFPLM

EVAL_BATCH = 1024  # positions per evaluation step: 1024 x 49k float32 logits is 200 MB
CONTEXT_MODES = ("cvfp", "zeros", "shuffled")


@dataclass
class EpochFigures:
    epoch: int
    train_loss: float
    val_loss: float | None  # None for an epoch that was not evaluated
    val_ppl: float | None
    val_accuracy: float | None


def control_contexts(contexts: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """What the TokenBlock reads at each position [N, L, D] under a context control."""
    if mode == "cvfp":
        return contexts
    if mode == "zeros":
        return torch.zeros_like(contexts)
    if mode == "shuffled":
        if len(contexts) < 2:
            return contexts
        return contexts[torch.tensor(derangement(len(contexts), seed))]
    raise NewllmError(f"contexts must be one of {', '.join(CONTEXT_MODES)}, got {mode!r}.")


def shortlist_ids(token_ids: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent targets (token_ids[1:]) of a train stream, ties by id: [K]."""
    counts = torch.bincount(token_ids[1:], minlength=vocab_size)
    return torch.argsort(-counts, stable=True)[:size]


class ShortlistHead(nn.Module):
    """The training softmax over K shortlist rows of the head plus one class "other"."""

    def __init__(self, ids: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        vocab_size = weight.shape[0]
        classes = torch.full((vocab_size,), len(ids), dtype=torch.long)
        classes[ids] = torch.arange(len(ids))
        self.register_buffer("ids", ids.clone())
        self.register_buffer("classes", classes)  # full id -> class (len(ids) = other)
        others = classes == len(ids)
        self.other = nn.Parameter(weight.detach()[others].mean(dim=0).clone())
        self.other_bias = nn.Parameter(torch.tensor(math.log(max(int(others.sum()), 1))))

    def loss(self, token_out: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        """token_out [B, E], the head's weight [V, E], full-vocabulary targets [B]."""
        short = F.linear(token_out, weight[self.ids])  # [B, K]
        other = token_out @ self.other + self.other_bias  # [B]
        logits = torch.cat([short, other[:, None]], dim=1)
        return F.cross_entropy(logits.float(), self.classes[targets])


class _Training(nn.Module):
    """What the Trainer fits: the LM and, with a shortlist, its training-only head."""

    def __init__(self, model: CVFPLM, head: ShortlistHead | None) -> None:
        super().__init__()
        self.model = model
        self.head = head


def layer_inputs(contexts: torch.Tensor) -> list[torch.Tensor]:
    """[N, L, D] -> the TokenBlock's per-layer inputs, L x [N, D]."""
    return list(contexts.unbind(dim=1))


def freeze_for_phase2(model: CVFPLM) -> None:
    model.requires_grad_(False)
    for part in model.trainable_parts():
        part.requires_grad_(True)


def parameter_counts(model: CVFPLM) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    head = model.head.weight.numel() if model.head is not None else 0
    return {"parameters_total": total,
            "parameters_trainable": sum(p.numel() for p in model.parameters()
                                        if p.requires_grad),
            "parameters_context_blocks": sum(p.numel() for p in
                                             model.context_blocks.parameters()),
            "parameters_token_block": sum(p.numel() for p in model.token_block.parameters()),
            "parameters_embedding": model.embedding.numel(), "parameters_head": head}


@torch.no_grad()
def evaluate(model: CVFPLM, contexts: torch.Tensor, token_ids: torch.Tensor,
             separator_id: int, device: torch.device) -> tuple[float, float, int]:
    """(mean NLL, accuracy, scored positions) of predicting token t+1 from position t, over
    targets that are not the separator (as eval-ppl scores)."""
    model.eval()
    targets = token_ids[1:]
    rows = torch.nonzero(targets != separator_id).squeeze(1)
    nll, correct = 0.0, 0
    for start in range(0, len(rows), EVAL_BATCH):
        batch = rows[start:start + EVAL_BATCH]
        logits = model.next_token_logits(layer_inputs(contexts[batch].to(device)),
                                         token_ids[batch].to(device))
        wanted = targets[batch].to(device)
        nll += float(F.cross_entropy(logits.float(), wanted, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == wanted).sum())
    return nll / max(len(rows), 1), correct / max(len(rows), 1), len(rows)


def train_token_block(model: CVFPLM, train: tuple[torch.Tensor, torch.Tensor],
                      val: tuple[torch.Tensor, torch.Tensor], separator_id: int,
                      config: TrainConfig, generator: torch.Generator, *, shortlist: int = 0,
                      val_every_epoch: bool = True) -> list[EpochFigures]:
    """Train in place on (contexts [N, L, D], token ids [N]); val figures with the full
    head after every epoch, or after the last one only. Stops with a clear error if anything
    frozen changed."""
    contexts, token_ids = train
    if len(token_ids) < 2:
        raise NewllmError(f"{config.key}: the cached train stream has fewer than 2 tokens.")
    freeze_for_phase2(model)
    frozen = [model.context_blocks] + ([model.embedding] if model.config.freeze_embeddings
                                       else [])
    before = [_hash(part) for part in frozen]
    head = None
    if 0 < shortlist < model.config.vocab_size:  # a shortlist of every token is the full head
        head = ShortlistHead(shortlist_ids(token_ids, shortlist, model.config.vocab_size),
                             model.head_weight())
    trainer = Trainer(config)
    device = trainer.device
    contexts, token_ids = contexts.to(device), token_ids.to(device)

    def loss_fn(m: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(device)
        lm = m.model
        out = lm.token_block.forward_with_contexts(layer_inputs(contexts[rows]),
                                                   lm.embed(token_ids[rows]))
        if m.head is None:
            return F.cross_entropy(lm.logits(out).float(), token_ids[rows + 1])
        return m.head.loss(out, lm.head_weight(), token_ids[rows + 1])

    figures: list[tuple[float, float]] = []

    def on_val(m: torch.nn.Module) -> float:
        loss, accuracy, _ = evaluate(m.model, val[0], val[1], separator_id, device)
        figures.append((loss, accuracy))
        return loss

    history: list[Epoch] = trainer.fit(_Training(model, head), loss_fn, len(token_ids) - 1,
                                       generator, evaluate=on_val if val_every_epoch else None,
                                       desc=config.key)
    if not val_every_epoch:
        on_val(_Training(model, None))
        figures = [(math.nan, math.nan)] * (len(history) - 1) + figures
    if [_hash(part) for part in frozen] != before:
        raise NewllmError("a frozen part of the CVFP model changed during phase 2 (context "
                          "blocks or embeddings); this is a bug, please report it.")
    return [EpochFigures(e.epoch, e.train_loss, *((None,) * 3 if math.isnan(loss)
                                                 else (loss, math.exp(loss), accuracy)))
            for e, (loss, accuracy) in zip(history, figures, strict=True)]


def _hash(part: torch.nn.Module | torch.nn.Parameter) -> str:
    if isinstance(part, torch.nn.Module):
        return state_dict_hash(part)
    holder = torch.nn.Module()
    holder.register_buffer("value", part.detach())
    return state_dict_hash(holder)
