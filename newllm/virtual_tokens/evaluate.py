"""Held-out evaluation of virtual tokens: what the base does after `[sep, prefix, ...]` for
the prefixes no context / e* / a compressor's output / the full text.

Against the teacher (`[sep, text, follow]`) on the follow positions: the full KL, top-1
agreement (same argmax), top-k agreement (the teacher's argmax among the student's k most
likely tokens) and the NLL of the real follow tokens. Greedy agreement: the teacher's greedy
continuation of `[sep, text]` (`greedy_tokens` long) and, for each prefix, how many of its
leading tokens greedy decoding after `[sep, prefix]` reproduces (computed exactly by teacher
forcing, see `first_mismatch`). Vector regression of a compressor against e*: MSE, cosine,
relative norm error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from newllm.virtual_tokens.e_star import (
    embed,
    first_mismatch,
    kl_rows,
    masked_mean,
    prefix_logits,
    teacher_outputs,
)


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, sep_id: int, prefixes: Sequence[torch.Tensor],
                    length: int) -> torch.Tensor:
    """Exactly `length` greedy tokens after `[sep, prefix_i]` per row ([B, length]), by HF
    generate with a KV cache (rows left-padded; no stop at EOS, so every row has `length`)."""
    from newllm.core.tokens import first_token_id, left_pad

    sep = embed(model, torch.tensor([sep_id]))
    rows = [torch.cat([sep, p.to(sep.dtype)]) for p in prefixes]
    # padding is masked out (and sits before every real position), so any id will do
    pad = first_token_id(model.config.pad_token_id, sep_id)
    embeds, mask, _ = left_pad(rows, embed(model, torch.tensor([pad]))[0])
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                         max_new_tokens=length, min_new_tokens=length, pad_token_id=pad,
                         num_beams=1)
    return out[:, -length:].cpu()


@torch.no_grad()
def prefix_figures(model: torch.nn.Module, sep_id: int, prefixes: Sequence[torch.Tensor],
                   follows: Sequence[torch.Tensor], teacher_logp: torch.Tensor,
                   greedy: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """Per-example figures [B] of one kind of prefix (embeddings after sep, [P_i, d])."""
    logits, mask = prefix_logits(model, sep_id, prefixes, follows)
    teacher_top = teacher_logp.argmax(dim=-1)
    student_top = logits.topk(topk, dim=-1).indices
    labels = torch.nn.utils.rnn.pad_sequence([f.long() for f in follows],
                                             batch_first=True).to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    g = greedy.to(logits.device)
    g_logits, g_mask = prefix_logits(model, sep_id, prefixes, list(g))
    return {
        "kl": kl_rows(teacher_logp, logits, mask),
        "top1": masked_mean((student_top[..., 0] == teacher_top).float(), mask),
        "topk": masked_mean((student_top == teacher_top[..., None]).any(dim=-1).float(), mask),
        "nll": masked_mean(nll, mask),
        "greedy_len": first_mismatch(g_logits.argmax(dim=-1), g, g_mask).float(),
    }


@torch.no_grad()
def evaluate_prefixes(model: torch.nn.Module, sep_id: int, texts: Sequence[torch.Tensor],
                      follows: Sequence[torch.Tensor], variants: dict[str, torch.Tensor | None],
                      *, greedy_tokens: int, topk: int, batch_size: int,
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """{variant: {figure: per-example values [N]}} for `variants` {name: vectors [N, k, d]},
    plus `no_context` and `full_text` (variants given as None)."""
    device = model.get_input_embeddings().weight.device
    d = model.get_input_embeddings().embedding_dim
    results: dict[str, dict[str, list[torch.Tensor]]] = {}
    for start in range(0, len(texts), batch_size):
        end = start + batch_size
        t_batch, f_batch = texts[start:end], follows[start:end]
        teacher = teacher_outputs(model, sep_id, t_batch, f_batch, hidden_layer=None,
                                  context_layer=None)
        text_prefixes = [embed(model, t.long()) for t in t_batch]
        greedy = greedy_generate(model, sep_id, text_prefixes, greedy_tokens)
        for name, vectors in variants.items():
            if name == "no_context":
                prefixes = [torch.zeros(0, d, device=device)] * len(t_batch)
            elif name == "full_text":
                prefixes = text_prefixes
            else:
                assert vectors is not None
                prefixes = list(vectors[start:end].to(device))
            figures = prefix_figures(model, sep_id, prefixes, f_batch, teacher.logp, greedy,
                                     topk)
            for key, value in figures.items():
                results.setdefault(name, {}).setdefault(key, []).append(value.cpu())
    return {name: {k: torch.cat(v) for k, v in figs.items()} for name, figs in results.items()}


def vector_figures(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MSE, mean cosine and mean relative norm error of predicted vs target vectors."""
    p, t = predicted.float().reshape(-1, predicted.shape[-1]), target.float().reshape(
        -1, target.shape[-1])
    return {
        "mse": F.mse_loss(p, t).item(),
        "cosine": F.cosine_similarity(p, t, dim=-1).mean().item(),
        "rel_norm_err": ((p.norm(dim=-1) - t.norm(dim=-1)).abs() / t.norm(dim=-1)).mean().item(),
    }


# --- controls: vectors that carry no text, or another text --------------------------------

def mean_constant(e_star: torch.Tensor) -> torch.Tensor:
    """The mean of training e* [N, k, d] per virtual position: [k, d]. Averaging vectors of
    diverse directions shrinks the norm, so this constant is much shorter than any e*."""
    return e_star.float().mean(dim=0)


def mean_norms(e_star: torch.Tensor) -> torch.Tensor:
    """The mean norm of training e* [N, k, d] per virtual position: [k]."""
    return e_star.float().norm(dim=-1).mean(dim=0)


def norm_matched_constant(e_star: torch.Tensor) -> torch.Tensor:
    """The mean training e*'s direction scaled to the training e*'s mean norm, per virtual
    position: [k, d]. The constant of the right size."""
    mean = mean_constant(e_star)
    return F.normalize(mean, dim=-1) * mean_norms(e_star)[:, None]


def random_same_norm(count: int, e_star: torch.Tensor, seed: int) -> torch.Tensor:
    """`count` seeded random directions per virtual position, each scaled to the training
    e*'s mean norm there: [count, k, d]."""
    _, k, d = e_star.shape
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(count, k, d, generator=g), dim=-1)
    return directions * mean_norms(e_star)[None, :, None]
