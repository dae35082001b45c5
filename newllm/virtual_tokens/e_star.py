"""Virtual tokens e* (seeds/002 §6): k input vectors optimized per example.

Two objectives, one machinery:

- `continue`: the frozen base reads `[sep, e*_1..e*_k, follow]` and must give, at the
  positions that predict each follow token, the next-token distributions it gives when it
  reads the whole context `[sep, text, follow]` (forward KL(teacher || student), mean over
  those positions), plus an optional hidden-state match at `hidden_loss_index`.
- `reconstruct` (the "cramming" setting): the base reads `[sep, e*, text]` and must predict
  `text` itself (cross-entropy at the positions that predict each text token).

The document separator comes first in every row, student and teacher alike: the first
position of a sequence acts as an attention sink (its hidden state is huge and every later
position attends to it), so a virtual token put there is wasted, and the prediction made at
it never learns (measured on the default base). After `sep` the virtual tokens sit where a
document's first tokens would.

Batched optimization: the e* of many examples are one tensor [B, k, d]. Rows are padded on
the right (the causal mask keeps padding out of every real position, and real positions keep
their position ids), losses are masked to the real positions, and the batch loss is the
*sum* of per-example losses, so each example gets exactly the gradient it would get alone;
Adam is element-wise, so a batch is the same optimization as B separate ones (up to float
rounding of differently shaped matrix products).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from newllm.core.errors import NewllmError
from newllm.core.hidden import decoder_of, resolve_layer_index
from newllm.core.runtime import progress

OBJECTIVES = ("continue", "reconstruct")
INITS = ("mean_embedding", "text_embeddings")
HIDDEN_LOSSES = ("cosine", "mse", "cosine_norm")


@dataclass(frozen=True)
class EStarConfig:
    objective: str = "continue"  # continue | reconstruct
    num_virtual: int = 1
    steps: int = 100
    lr: float = 0.05  # Adam, cosine-decayed to 0 over the steps
    init: str = "mean_embedding"  # mean_embedding | text_embeddings
    hidden_weight: float = 0.0  # continue only: weight of the hidden-state match
    hidden_loss_index: int = -2  # a hidden_states index (0 = embeddings)
    hidden_loss_type: str = "cosine"
    batch_size: int = 16
    compute_dtype: str = "float32"  # float32 | bfloat16 (autocast of the base's forward)

    def __post_init__(self) -> None:
        if self.num_virtual < 1:
            raise NewllmError(f"num_virtual must be at least 1, got {self.num_virtual}.")
        for key, value, allowed in (("objective", self.objective, OBJECTIVES),
                                    ("init", self.init, INITS),
                                    ("hidden_loss_type", self.hidden_loss_type, HIDDEN_LOSSES)):
            if value not in allowed:
                raise NewllmError(f"{key} must be one of {', '.join(allowed)}, got {value!r}.")


# --- forward passes -----------------------------------------------------------------------

def embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of `ids` (any shape) as float tensors on the model's device."""
    table = model.get_input_embeddings()
    return table(ids.to(table.weight.device))


def continuation_positions(prefix_lengths: Sequence[int], continuation_lengths: Sequence[int],
                           total: int, device: torch.device | str = "cpu",
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """In right-padded rows `[prefix_i, continuation_i]` of `total` positions: the positions
    [B, C] that predict each continuation token (the last prefix position predicts
    continuation[0]; padding points at a real index) and their mask [B, C]."""
    cont = torch.tensor(list(continuation_lengths), device=device)
    offsets = torch.arange(int(cont.max()), device=device)[None]
    starts = torch.tensor([n - 1 for n in prefix_lengths], device=device)[:, None]
    return (starts + offsets).clamp_max(total - 1), offsets < cont[:, None]


def read_continuations(model: torch.nn.Module, prefixes: Sequence[torch.Tensor],
                       continuations: Sequence[torch.Tensor], want_states: bool,
                       compute_dtype: str) -> tuple[object, torch.Tensor, torch.Tensor]:
    """One right-padded pass of `[prefix_i, continuation_i]`: the decoder's output, the
    positions [B, C] that predict each continuation token and their mask [B, C]."""
    device = prefixes[0].device
    rows = [torch.cat([p, embed(model, c.long()).to(p.dtype)]) for p, c in
            zip(prefixes, continuations, strict=True)]
    lengths = torch.tensor([len(r) for r in rows], device=device)
    embeds = pad_sequence(rows, batch_first=True)
    attention = (torch.arange(embeds.shape[1], device=device)[None] < lengths[:, None]).long()
    positions, mask = continuation_positions([len(p) for p in prefixes],
                                             [len(c) for c in continuations], embeds.shape[1],
                                             device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
        out = decoder_of(model)(inputs_embeds=embeds, attention_mask=attention, use_cache=False,
                                output_hidden_states=want_states)
    return out, positions, mask


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """states [B, L, d] at positions [B, C] -> [B, C, d]."""
    return states.gather(1, positions[..., None].expand(-1, -1, states.shape[-1]))


def continuation_logits(model: torch.nn.Module, prefixes: Sequence[torch.Tensor],
                        continuations: Sequence[torch.Tensor], *,
                        hidden_layer: int | None = None, compute_dtype: str = "float32",
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Read `prefix_i` (embeddings [P_i, d]) then `continuation_i` (ids [C_i]); return the
    logits at the C_i positions that predict each continuation token ([B, C, V], C = max C_i:
    the last prefix position predicts continuation[0], continuation[j] predicts [j+1]), the
    mask of real positions [B, C], and the hidden states at `hidden_layer` (a resolved
    hidden-states index) there, or None.

    Rows are right-padded; the LM head runs only on the gathered positions.
    """
    out, positions, mask = read_continuations(model, prefixes, continuations,
                                              hidden_layer is not None, compute_dtype)
    with torch.autocast(positions.device.type, dtype=torch.bfloat16,
                        enabled=compute_dtype == "bfloat16"):
        logits = model.get_output_embeddings()(
            gather_positions(out.last_hidden_state, positions)).float()
    hidden = (gather_positions(out.hidden_states[hidden_layer], positions).float()
              if hidden_layer is not None else None)
    return logits, mask, hidden


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions of each row: [B, C] -> [B]."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def kl_rows(teacher_logp: torch.Tensor, student_logits: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over real positions of KL(teacher || student) in nats: [B]."""
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    per_position = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)
    return masked_mean(per_position, mask)


def hidden_loss_rows(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                     kind: str) -> torch.Tensor:
    """Per-row hidden-state mismatch at the real positions: cosine | mse | cosine_norm."""
    cosine = 1 - F.cosine_similarity(student, teacher, dim=-1)
    if kind == "cosine":
        per_position = cosine
    elif kind == "mse":
        per_position = (student - teacher).pow(2).mean(dim=-1)
    else:  # cosine_norm: direction and relative norm
        norm_t = teacher.norm(dim=-1)
        per_position = cosine + ((student.norm(dim=-1) - norm_t) / norm_t.clamp_min(1e-6)) ** 2
    return masked_mean(per_position, mask)


# --- examples and their teacher -------------------------------------------------------------

@dataclass
class Teacher:
    """What the full context tells about each example's follow positions (continue objective)."""

    logp: torch.Tensor  # [B, C, V] log-probabilities at the positions predicting follow tokens
    mask: torch.Tensor  # [B, C] real positions
    hidden: torch.Tensor | None  # [B, C, d] at the hidden layer (None without one)
    context_hidden: list[torch.Tensor]  # per example [T_i, d] at the context layer (sep left out)


def separator_rows(model: torch.nn.Module, sep_id: int, count: int) -> torch.Tensor:
    """The separator's embedding [count, 1, d]."""
    return embed(model, torch.full((count, 1), sep_id, dtype=torch.long))


@torch.no_grad()
def teacher_outputs(model: torch.nn.Module, sep_id: int, texts: Sequence[torch.Tensor],
                    follows: Sequence[torch.Tensor], *, hidden_layer: int | None,
                    context_layer: int | None, compute_dtype: str = "float32") -> Teacher:
    """One batched pass of `[sep, text, follow]` per example."""
    num_layers = len(decoder_of(model).layers)
    prefixes = [embed(model, torch.cat([torch.tensor([sep_id]), t.long()])) for t in texts]
    want = hidden_layer is not None or context_layer is not None
    out, positions, mask = read_continuations(model, prefixes, follows, want, compute_dtype)
    with torch.autocast(positions.device.type, dtype=torch.bfloat16,
                        enabled=compute_dtype == "bfloat16"):
        logits = model.get_output_embeddings()(
            gather_positions(out.last_hidden_state, positions)).float()
    hidden, context = None, []
    if hidden_layer is not None:
        states = out.hidden_states[resolve_layer_index(hidden_layer, num_layers)]
        hidden = gather_positions(states, positions).float()
    if context_layer is not None:
        states = out.hidden_states[resolve_layer_index(context_layer, num_layers)]
        # the separator's state (an attention sink, orders of magnitude larger) is left out
        context = [states[i, 1:1 + len(t)].float() for i, t in enumerate(texts)]
    return Teacher(F.log_softmax(logits, dim=-1), mask, hidden, context)


def initial_vectors(model: torch.nn.Module, texts: Sequence[torch.Tensor], k: int,
                    init: str) -> torch.Tensor:
    """Starting e* [B, k, d]: the mean input embedding, or the mean embedding of each of k
    consecutive chunks of the text."""
    weight = model.get_input_embeddings().weight.detach().float()
    if init == "mean_embedding":
        return weight.mean(dim=0).expand(len(texts), k, -1).clone()
    rows = []
    for text in texts:
        chunks = torch.tensor_split(text.long(), min(k, len(text)))
        means = [weight[c.to(weight.device)].mean(dim=0) for c in chunks]
        means += [weight.mean(dim=0)] * (k - len(means))  # a text shorter than k
        rows.append(torch.stack(means))
    return torch.stack(rows)


# --- the optimization -----------------------------------------------------------------------

@dataclass
class EStarResult:
    e_star: torch.Tensor  # [N, k, d] float32, cpu
    initial_loss: torch.Tensor  # [N] objective loss before the first step
    final_loss: torch.Tensor  # [N] after the last step (KL for continue, CE for reconstruct)
    history: list[float]  # mean loss over the examples per step (batches averaged)
    row_history: torch.Tensor  # [steps, N] each example's loss per step


@dataclass
class ExactResult:
    """`reconstruct_until_exact`: per text, the e* at the step it became exact (or at the cap)."""

    e_star: torch.Tensor  # [N, k, d] float32, cpu
    steps: torch.Tensor  # [N] Adam steps taken (the step at which it became exact, or the cap)
    exact: torch.Tensor  # [N] bool: greedy decoding after [sep, e*] reproduces the whole text
    exact_len: torch.Tensor  # [N] leading tokens greedy decoding reproduces
    final_ce: torch.Tensor  # [N] cross-entropy of the text after [sep, e*]

def _row_losses(model: torch.nn.Module, config: EStarConfig, sep_id: int, vectors: torch.Tensor,
                targets: Sequence[torch.Tensor], teacher: Teacher | None) -> torch.Tensor:
    """Per-example loss [B] of `vectors` [B, k, d]."""
    prefixes = torch.cat([separator_rows(model, sep_id, len(vectors)).to(vectors.dtype),
                          vectors], dim=1)
    want_hidden = teacher is not None and config.hidden_weight > 0
    logits, mask, hidden = continuation_logits(
        model, list(prefixes), targets, compute_dtype=config.compute_dtype,
        hidden_layer=(resolve_layer_index(config.hidden_loss_index,
                                          len(decoder_of(model).layers))
                      if want_hidden else None))
    if teacher is None:  # reconstruct: the text itself is the target
        labels = pad_sequence([t.long() for t in targets], batch_first=True).to(logits.device)
        ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return masked_mean(ce, mask)
    loss = kl_rows(teacher.logp, logits, mask)
    if want_hidden:
        assert hidden is not None and teacher.hidden is not None
        loss = loss + config.hidden_weight * hidden_loss_rows(hidden, teacher.hidden, mask,
                                                               config.hidden_loss_type)
    return loss


def optimize_batch(model: torch.nn.Module, config: EStarConfig, sep_id: int,
                   texts: Sequence[torch.Tensor], follows: Sequence[torch.Tensor] | None,
                   teacher: Teacher | None = None) -> EStarResult:
    """Optimize the e* of one batch of examples together (see the module docstring)."""
    device = model.get_input_embeddings().weight.device
    if config.objective == "continue":
        if follows is None:
            raise NewllmError("the continue objective needs follow texts.")
        if teacher is None:
            teacher = teacher_outputs(model, sep_id, texts, follows,
                                      hidden_layer=(config.hidden_loss_index
                                                    if config.hidden_weight > 0 else None),
                                      context_layer=None, compute_dtype=config.compute_dtype)
        targets = follows
    else:
        teacher, targets = None, texts
    vectors = initial_vectors(model, texts, config.num_virtual, config.init).to(device)
    vectors.requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.steps, 1))
    history, rows_seen, initial = [], [], None
    for _ in range(config.steps):
        rows = _row_losses(model, config, sep_id, vectors, targets, teacher)
        if initial is None:
            initial = rows.detach()
        total = rows.sum()  # a sum: each example's gradient is what it would be alone
        if not math.isfinite(total.item()):
            raise NewllmError(f"the e* loss became {total.item()}; lower build_e_star.lr "
                              f"({config.lr}).")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        history.append(rows.detach().mean().item())
        rows_seen.append(rows.detach().float().cpu())
    with torch.no_grad():
        final = _row_losses(model, config, sep_id, vectors, targets, teacher)
    if initial is None:
        initial = final
    if config.hidden_weight > 0 and teacher is not None:
        # report the KL alone as "final": the hidden term is an aid, not the goal
        with torch.no_grad():
            prefixes = torch.cat([separator_rows(model, sep_id, len(vectors)), vectors], dim=1)
            logits, mask, _ = continuation_logits(model, list(prefixes), targets,
                                                  compute_dtype=config.compute_dtype)
            final = kl_rows(teacher.logp, logits, mask)
    return EStarResult(vectors.detach().float().cpu(), initial.float().cpu(),
                       final.float().cpu(), history,
                       torch.stack(rows_seen) if rows_seen else torch.zeros(0, len(texts)))


def optimize_e_star(model: torch.nn.Module, config: EStarConfig, sep_id: int,
                    texts: Sequence[torch.Tensor], follows: Sequence[torch.Tensor] | None = None,
                    desc: str = "build-e-star") -> EStarResult:
    """Optimize every example's e*, `config.batch_size` examples at a time."""
    results = []
    starts = range(0, len(texts), config.batch_size)
    for start in progress(starts, desc=desc, total=len(starts), unit="batch"):
        end = start + config.batch_size
        results.append(optimize_batch(model, config, sep_id, texts[start:end],
                                      None if follows is None else follows[start:end]))
    steps = len(results[0].history)
    weights = [len(r.e_star) for r in results]
    history = [sum(r.history[s] * w for r, w in zip(results, weights, strict=True))
               / sum(weights) for s in range(steps)]
    return EStarResult(torch.cat([r.e_star for r in results]),
                       torch.cat([r.initial_loss for r in results]),
                       torch.cat([r.final_loss for r in results]), history,
                       torch.cat([r.row_history for r in results], dim=1))


def reconstruct_until_exact(model: torch.nn.Module, config: EStarConfig, sep_id: int,
                            texts: Sequence[torch.Tensor], max_steps: int,
                            desc: str = "reconstruct") -> ExactResult:
    """Cram each text into k vectors (`[sep, e*]` must reproduce it) with Adam at the
    constant `config.lr`, one batch, until greedy decoding reproduces the whole text or
    `max_steps` steps were taken.

    Before each step the batch's teacher-forced logits tell which rows are already exact
    (greedy decoding follows the teacher-forced prefix until its first error, see
    `first_mismatch`); those rows leave the batch with the e* they have, and the others take
    one step. Adam is element-wise and every remaining row has taken every step so far, so a
    row's e* is the one it would get optimized alone (up to float rounding of differently
    shaped products), whenever the others stop.
    """
    device = model.get_input_embeddings().weight.device
    vectors = initial_vectors(model, texts, config.num_virtual, config.init).to(device)
    vectors.requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=config.lr)
    count = len(texts)
    steps = torch.full((count,), max_steps, dtype=torch.long)
    exact = torch.zeros(count, dtype=torch.bool)
    bar = progress(range(max_steps + 1), desc=desc, total=max_steps + 1, unit="step")
    for step in bar:
        active = (~exact).nonzero().flatten()
        if len(active) == 0:
            break
        prefixes = torch.cat([separator_rows(model, sep_id, len(active)).to(vectors.dtype),
                              vectors[active.to(device)]], dim=1)
        targets = [texts[i] for i in active.tolist()]
        logits, mask, _ = continuation_logits(model, list(prefixes), targets,
                                              compute_dtype=config.compute_dtype)
        labels = pad_sequence([t.long() for t in targets], batch_first=True).to(device)
        matched = first_mismatch(logits.argmax(dim=-1), labels, mask) == mask.sum(dim=1)
        finished = active[matched.cpu()]
        exact[finished] = True
        steps[finished] = step
        if step == max_steps or bool(matched.all()):
            break
        ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        total = masked_mean(ce, mask)[~matched].sum()
        if not math.isfinite(total.item()):
            raise NewllmError(f"the reconstruction loss became {total.item()}; lower "
                              f"reconstruct_capacity.lr ({config.lr}).")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        # rows that are done keep their vectors: Adam's momentum would still move them
        done = exact.to(device)
        kept = vectors.detach()[done].clone()
        optimizer.step()
        with torch.no_grad():
            vectors[done] = kept
    # the figures of the returned vectors, all rows read together
    e_star = vectors.detach().float()
    logits, mask = prefix_logits(model, sep_id, list(e_star), texts, config.compute_dtype)
    labels = pad_sequence([t.long() for t in texts], batch_first=True).to(device)
    ce = masked_mean(F.cross_entropy(logits.transpose(1, 2), labels, reduction="none"), mask)
    exact_len = first_mismatch(logits.argmax(dim=-1), labels, mask).cpu()
    return ExactResult(e_star.cpu(), steps, exact_len == torch.tensor([len(t) for t in texts]),
                       exact_len, ce.cpu())


# --- measurements -------------------------------------------------------------------------

@torch.no_grad()
def prefix_logits(model: torch.nn.Module, sep_id: int, prefixes: Sequence[torch.Tensor],
                  continuations: Sequence[torch.Tensor], compute_dtype: str = "float32",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and mask at the positions predicting `continuations` after `[sep, prefix_i]`
    (prefix_i: embeddings [P_i, d], possibly empty)."""
    sep = separator_rows(model, sep_id, 1)[0]
    rows = [torch.cat([sep, p.to(sep.dtype).to(sep.device)]) for p in prefixes]
    logits, mask, _ = continuation_logits(model, rows, continuations,
                                          compute_dtype=compute_dtype)
    return logits, mask


def first_mismatch(predicted: torch.Tensor, target: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading real positions have predicted == target: [B] int.

    With teacher forcing on `target`, this is exactly the length over which greedy decoding
    reproduces `target` (greedy decoding follows the same prefix until its first error).
    """
    wrong = (predicted != target) | ~mask
    width = wrong.shape[1]
    index = torch.where(wrong, torch.arange(width, device=wrong.device)[None], width)
    return torch.minimum(index.min(dim=1).values, mask.sum(dim=1))


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, sep_id: int, prefixes: Sequence[torch.Tensor],
                         length: int, compute_dtype: str = "float32") -> torch.Tensor:
    """Greedy `length` tokens after `[sep, prefix_i]` for each row: [B, length] ids.

    A plain loop over the whole sequence each step (no cache): short and exact."""
    device = model.get_input_embeddings().weight.device
    generated = torch.zeros(len(prefixes), 0, dtype=torch.long, device=device)
    for step in range(length):
        # the last position of each row predicts the next token
        conts = [torch.cat([g, g.new_zeros(1)]) for g in generated]
        logits, _ = prefix_logits(model, sep_id, prefixes, conts, compute_dtype)
        generated = torch.cat([generated, logits[:, step].argmax(dim=-1, keepdim=True)], dim=1)
    return generated.cpu()


def reconstruction_metrics(model: torch.nn.Module, sep_id: int, e_star: torch.Tensor,
                           texts: Sequence[torch.Tensor], compute_dtype: str = "float32",
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: teacher-forced token accuracy and greedy exact-match length of `text`
    after `[sep, e*]`."""
    device = model.get_input_embeddings().weight.device
    logits, mask = prefix_logits(model, sep_id, list(e_star.to(device)), texts, compute_dtype)
    labels = pad_sequence([t.long() for t in texts], batch_first=True).to(device)
    correct = (logits.argmax(dim=-1) == labels) & mask
    accuracy = correct.sum(dim=1).float() / mask.sum(dim=1).float()
    return accuracy.cpu(), first_mismatch(logits.argmax(dim=-1), labels, mask).cpu()


def no_context_kl(model: torch.nn.Module, sep_id: int, follows: Sequence[torch.Tensor],
                  teacher: Teacher, compute_dtype: str = "float32") -> torch.Tensor:
    """Per-example KL of `[sep, follow]` (no context at all) to the teacher: [B]."""
    device = model.get_input_embeddings().weight.device
    empty = [torch.zeros(0, model.get_input_embeddings().embedding_dim, device=device)] * len(
        follows)
    logits, mask = prefix_logits(model, sep_id, empty, follows, compute_dtype)
    return kl_rows(teacher.logp, logits, mask).cpu()


def topk_kl_rows(student_logits: torch.Tensor, teacher_logp: torch.Tensor,
                 teacher_ids: torch.Tensor, mask: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Per-row KL(teacher || student) over the teacher's top-K tokens plus one bucket for all
    other tokens (what a stored top-K teacher allows): [B].

    At temperature 1 this is the exact KL between the two distributions coarse-grained to
    K + 1 outcomes (a lower bound of the full KL). At another temperature both sides' bucket
    log-masses are divided by it and renormalized, scaled by T^2 as usual in distillation.
    """
    full = F.log_softmax(student_logits.float(), dim=-1)
    top = full.gather(-1, teacher_ids.long())
    rest_student = torch.log1p(-top.exp().sum(dim=-1).clamp(max=1 - 1e-6))
    rest_teacher = torch.log1p(-teacher_logp.exp().sum(dim=-1).clamp(max=1 - 1e-6))
    s = F.log_softmax(torch.cat([top, rest_student[..., None]], dim=-1) / temperature, dim=-1)
    t = F.log_softmax(torch.cat([teacher_logp, rest_teacher[..., None]], dim=-1) / temperature,
                      dim=-1)
    per_position = (t.exp() * (t - s)).sum(dim=-1) * temperature ** 2
    return masked_mean(per_position, mask)


def make_pairs(doc_ids: Sequence[torch.Tensor], count: int, text_tokens: int,
               follow_tokens: int, seed: int, where: str) -> list[tuple[int, torch.Tensor,
                                                                         torch.Tensor]]:
    """`count` (document index, text, follow_text) pairs: a document's first `text_tokens`
    tokens and the `follow_tokens` after them (consecutive spans of one document), from
    documents drawn in a seeded order among those long enough."""
    need = text_tokens + follow_tokens
    eligible = [i for i, ids in enumerate(doc_ids) if len(ids) >= need]
    if len(eligible) < count:
        raise NewllmError(f"{where} has {len(eligible)} document(s) of at least "
                          f"text_tokens + follow_tokens = {need} tokens, {count} are needed; "
                          "lower the counts or the lengths.")
    order = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))
    chosen = sorted(eligible[i] for i in order[:count].tolist())
    return [(i, doc_ids[i][:text_tokens].long(), doc_ids[i][text_tokens:need].long())
            for i in chosen]


def check_context_fits(model: torch.nn.Module, length: int, what: str) -> None:
    """Stop if `length` positions exceed the base's context (max_position_embeddings)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise NewllmError(f"{what} = {length} positions exceed the base model's context of "
                          f"{limit} (max_position_embeddings); shorten the text or follow_text.")


E_STAR_KIND = "virtual-token-e-star"


def pad_ids(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids right-padded with 0 [N, L] and lengths [N] (for storage)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    return pad_sequence([s.long() for s in seqs], batch_first=True), lengths


def unpad(padded: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return [row[:n] for row, n in zip(padded, lengths.tolist(), strict=True)]


@dataclass
class EStarSet:
    """A loaded e* artifact (one split) of the continue objective.

    Every pair has its text's context hidden states and the teacher's top-K; only the pairs
    of `has_e_star` have an optimized e* (the others' rows of `e_star` are zeros).
    """

    e_star: torch.Tensor  # [N, k, d] (zeros where has_e_star is False)
    has_e_star: torch.Tensor  # [N] bool
    doc_index: torch.Tensor  # [N] the document each pair comes from (of its split)
    texts: list[torch.Tensor]
    follows: list[torch.Tensor]
    context_hidden: torch.Tensor  # [N, T, d] (zero-padded)
    context_mask: torch.Tensor  # [N, T] bool
    teacher_logp: torch.Tensor  # [N, C, K] top-K teacher log-probabilities
    teacher_ids: torch.Tensor  # [N, C, K]
    teacher_hidden: torch.Tensor | None  # [N, C, d] at extra["hidden_layer_index"]
    final_kl: torch.Tensor  # [N]
    no_context_kl: torch.Tensor  # [N]
    meta: dict

    @property
    def num_virtual(self) -> int:
        return self.e_star.shape[1]

    def optimized_e_star(self) -> torch.Tensor:
        """The e* of the pairs that have one: [N_e, k, d]."""
        return self.e_star[self.has_e_star]

    def to(self, device: torch.device | str) -> EStarSet:
        """The same set with every tensor on `device`."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return EStarSet(self.e_star.to(device), self.has_e_star.to(device), self.doc_index,
                        [t.to(device) for t in self.texts],
                        [f.to(device) for f in self.follows], self.context_hidden.to(device),
                        self.context_mask.to(device), self.teacher_logp.to(device),
                        self.teacher_ids.to(device), move(self.teacher_hidden),
                        self.final_kl, self.no_context_kl, self.meta)

    def follow_mask(self) -> torch.Tensor:
        lengths = torch.tensor([len(f) for f in self.follows])
        return torch.arange(self.teacher_logp.shape[1])[None] < lengths[:, None]


def load_e_star(path: str | Path, base: dict) -> EStarSet:
    """Read an e* artifact made from `base` (kind and weights hash checked) by the continue
    objective."""
    from newllm.core.artifacts import load_artifact

    artifact = load_artifact(path, kind=E_STAR_KIND, base=base)
    extra = artifact.meta["extra"]
    if extra.get("objective") != "continue":
        raise NewllmError(f"{path} holds e* of the '{extra.get('objective')}' objective; "
                          "expected 'continue' (text -> follow_text), the compressor's target.")
    t = artifact.tensors
    texts = unpad(t["text_ids"], t["text_len"])
    lengths = t["text_len"]
    mask = torch.arange(t["context_hidden"].shape[1])[None] < lengths[:, None]
    return EStarSet(t["e_star"], t["has_e_star"].bool(), t["doc_index"], texts,
                    unpad(t["follow_ids"], t["follow_len"]),
                    t["context_hidden"], mask, t["teacher_topk_logp"], t["teacher_topk_ids"],
                    t.get("teacher_hidden"), t["final_kl"], t["no_context_kl"], artifact.meta)
