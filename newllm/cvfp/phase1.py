"""Phase 1: train each ContextBlock so its contexts are diverse and near a fixed point.

The seeds' recipe (seeds/001, seeds/003), per block, on that block's own token slice:

- iteration 0 (`init: sequential`): one sequential pass of the untrained block from its
  initial context, no learning; its contexts are `previous` (`init: noise`: small noise);
- iterations 1..max_iterations, the parallel shifted-previous-context iteration: every
  position t reads `previous[t-1]` (position 0 reads the initial context) and its own
  embedding, all at once in batches of `batch_size` positions; loss, optimizer step, and
  the new contexts (detached) become `previous`. Contexts are carried from one iteration to
  the next, never reset (seeds/001 "Bug 2").

Loss = cvfp_weight * MSE(new, target) + diversity_weight * diversity(new), with target =
`previous` (the seeds' loss code) or `first` (the iteration-0 contexts held fixed, their
"Bug 1" note), and diversity over a batch X [n, d] (mu its mean row, ||.|| Frobenius):
  dispersion    = -||X - mu|| / n                       (seeds/001)
  oacd          = -||X - mu|| / n + centroid_weight * ||mu||^2   (seeds/003)
  oacd_prenorm  = oacd of the states S before the last layer's norm (S = c + ReLU(W[c,e]+b))
  decorrelation = oacd + ||C / tr C||^2 - 1/d,   C = (X - mu)^T (X - mu) / n

Why the last two: with `context_norm: layernorm` every row of X has zero mean and norm
sqrt(d), so ||X - mu||^2 = n (d - ||mu||^2) and both seeds' objectives are functions of
||mu||^2 alone; any batch with mean 0 (a rank-1 cloud of +v and -v as much as an isotropic
one) is already optimal. `oacd_prenorm` reads S, which the norm has not fixed (ReLU >= 0
gives S a positive mean, so its centroid term bounds the scale); `decorrelation` keeps OACD
and adds 1/PR - 1/d, PR = (tr C)^2 / ||C||^2 the participation ratio of the batch
covariance: 0 for an isotropic batch, 1 - 1/d for a rank-1 one. PR is a second-moment
dimension of the centred batch, not the diagnostic below (the entropy of the singular
values of the uncentred validation contexts), but the two move together: under
`decorrelation` a higher val effective rank is partly by construction, which is why the
default objective is chosen by phase 2's PPL (docs/cvfp.md), never by the rank.

Fixed-point fidelity: after each iteration, the exact sequential recurrence of the block
(its weights after that iteration) over the same training slice, compared with the
parallel iteration's contexts: mean squared error and relative error ||P - X|| / ||X||.
The exact contexts are what phase 2 reads; the parallel ones are what phase 1 trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from newllm.core.errors import NewllmError
from newllm.core.params import check_choices
from newllm.core.runtime import progress
from newllm.cvfp.model import CVFPLM, ContextBlock
from newllm.cvfp.recurrence import block_contexts

INITS = ("sequential", "noise")
DIVERSITIES = ("oacd", "dispersion", "oacd_prenorm", "decorrelation")
CVFP_TARGETS = ("previous", "first")
BLOCK_DATA = ("split", "all")
INIT_CONTEXTS = ("zeros", "inherit")


@dataclass(frozen=True)
class Phase1Config:
    max_iterations: int = 10
    batch_size: int = 8192  # positions per optimizer step (seeds/003's out-of-memory fix)
    lr: float = 1e-3
    init: str = "sequential"
    diversity: str = "oacd"
    centroid_weight: float = 0.1
    cvfp_weight: float = 0.0
    diversity_weight: float = 1.0
    cvfp_target: str = "previous"
    convergence_threshold: float = 0.1
    convergence_target: float = 0.95
    lipschitz_samples: int = 64
    lipschitz_every_iteration: bool = True  # False: at iteration 0 and the last one only


def oacd(batch: torch.Tensor, centroid_weight: float) -> torch.Tensor:
    """[n, d] -> -||X - mu|| / n + centroid_weight * ||mu||^2 (seeds/003)."""
    mean = batch.mean(dim=0)
    return -torch.linalg.norm(batch - mean) / len(batch) + centroid_weight * mean.pow(2).sum()


def isotropy_gap(batch: torch.Tensor) -> torch.Tensor:
    """[n, d] -> ||C / tr C||^2 - 1/d = 1/PR - 1/d of the batch covariance C: 0 when C is
    isotropic, 1 - 1/d when the batch lies on one line."""
    centred = batch - batch.mean(dim=0)
    covariance = centred.T @ centred / len(batch)  # [d, d]
    normalized = covariance / covariance.trace().clamp_min(1e-12)
    return normalized.pow(2).sum() - 1.0 / batch.shape[1]


def diversity_loss(contexts: torch.Tensor, kind: str, centroid_weight: float,
                   pre_norm: torch.Tensor | None = None) -> torch.Tensor:
    """contexts [n, d] (and, for `oacd_prenorm`, the states before the norm [n, d]) -> the
    diversity term of `kind` (see the module docstring)."""
    if kind == "dispersion":
        return -torch.linalg.norm(contexts - contexts.mean(dim=0)) / len(contexts)
    if kind == "oacd":
        return oacd(contexts, centroid_weight)
    if kind == "oacd_prenorm":
        if pre_norm is None:
            raise ValueError("diversity oacd_prenorm needs the states before the norm")
        return oacd(pre_norm, centroid_weight)
    if kind == "decorrelation":
        return oacd(contexts, centroid_weight) + isotropy_gap(contexts)
    raise ValueError(f"unknown diversity {kind!r}")


def fixed_point_fidelity(parallel: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(mean squared error, relative error ||P - X|| / ||X||) of the parallel iteration's
    contexts P [N, d] against the exact sequential ones X [N, d]."""
    difference = (parallel - exact).double()
    return (float(difference.pow(2).mean()),
            float(difference.norm() / exact.double().norm().clamp_min(1e-30)))


def effective_rank(matrix: torch.Tensor) -> tuple[float, int, float]:
    """exp(entropy of the normalized singular values) of [n, d]: (value, d, percent of d).
    The singular values are the square roots of the eigenvalues of the d x d Gram matrix in
    float64 (several times faster than an SVD of the n x d matrix for n >> d)."""
    matrix = matrix.double()
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    p = singular / singular.sum()
    p = p[p > 0]
    value = math.exp(float(-(p * p.log()).sum()))
    return value, matrix.shape[1], 100.0 * value / matrix.shape[1]


def lipschitz_estimate(fn: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor,
                       generator: torch.Generator, iterations: int = 30) -> tuple[float, float]:
    """Largest singular value of the Jacobian of a row-wise map `fn` at each row of `states`
    [n, d], by power iteration on J^T J: (max over rows, mean over rows)."""
    states = states.detach()
    vectors = torch.randn(states.shape, generator=generator, dtype=states.dtype)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    sigma = torch.zeros(len(states))
    for _ in range(iterations):
        _, pullback = torch.func.vjp(fn, states)
        jv = torch.func.jvp(fn, (states,), (vectors,))[1]  # J v, row by row
        sigma = jv.detach().norm(dim=1)
        (jtjv,) = pullback(jv)
        vectors = jtjv / jtjv.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return float(sigma.max()), float(sigma.mean())


def shifted(previous: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """What each position reads: [initial, previous[:-1]]."""
    return torch.cat([initial[None], previous[:-1]])


def check_phase1_config(config: Phase1Config) -> None:
    check_choices("phase1_context", (("init", config.init, INITS),
                             ("diversity", config.diversity, DIVERSITIES),
                             ("cvfp_target", config.cvfp_target, CVFP_TARGETS)))


def train_block(block: ContextBlock, embeddings: torch.Tensor, val_embeddings: torch.Tensor,
                config: Phase1Config, generator: torch.Generator,
                desc: str = "phase1") -> tuple[list[dict[str, float]], torch.Tensor]:
    """Train `block` in place on normalized embeddings [N, E] of its slice.

    Returns one record per iteration (0 = before any step) and the last contexts [N, d].
    Validation figures use the exact sequential contexts of `val_embeddings` [M, E].
    """
    check_phase1_config(config)
    initial = block.initial_context
    if config.init == "sequential":
        previous = block_contexts(block, embeddings, initial)
    else:
        previous = 0.01 * torch.randn(len(embeddings), block.context_dim, generator=generator)
    first = previous
    optimizer = torch.optim.Adam(block.parameters(), lr=config.lr)
    records = [validation_record(block, 0, val_embeddings, config, generator)]
    for iteration in progress(range(1, config.max_iterations + 1), desc=desc, unit="iter"):
        inputs = shifted(previous, initial)
        new = torch.empty_like(previous)
        sums = {"cvfp_loss": 0.0, "diversity_loss": 0.0, "loss": 0.0}
        batches = range(0, len(embeddings), config.batch_size)
        for start in batches:
            rows = slice(start, start + config.batch_size)
            out, state = block.forward_with_pre_norm(inputs[rows], embeddings[rows])
            target = (previous if config.cvfp_target == "previous" else first)[rows]
            cvfp = F.mse_loss(out, target)
            diversity = diversity_loss(out, config.diversity, config.centroid_weight, state)
            loss = config.cvfp_weight * cvfp + config.diversity_weight * diversity
            if not torch.isfinite(loss):
                raise NewllmError(f"the phase-1 loss became {float(loss)} at iteration "
                                  f"{iteration}; lower phase1_context.lr ({config.lr}).")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            new[rows] = out.detach()
            for key, value in (("cvfp_loss", cvfp), ("diversity_loss", diversity),
                               ("loss", loss)):
                sums[key] += float(value.detach()) / len(batches)
        token_mse = (new - previous).pow(2).mean(dim=1)
        converged = float((token_mse < config.convergence_threshold).float().mean())
        previous = new  # carried into the next iteration, never reset
        fidelity_mse, fidelity_relative = fixed_point_fidelity(
            new, block_contexts(block, embeddings, initial))
        record = validation_record(block, iteration, val_embeddings, config, generator,
                                   lipschitz=config.lipschitz_every_iteration)
        records.append({**record, **sums, "convergence_rate": converged,
                        "steps": len(batches), "fidelity_mse": fidelity_mse,
                        "fidelity_relative": fidelity_relative})
        if converged >= config.convergence_target:
            break
    if "lipschitz_max" not in records[-1]:
        records[-1].update(validation_record(block, records[-1]["iteration"], val_embeddings,
                                             config, generator))
    return records, previous


@torch.no_grad()
def validation_record(block: ContextBlock, iteration: int, val_embeddings: torch.Tensor,
                      config: Phase1Config, generator: torch.Generator,
                      lipschitz: bool = True) -> dict[str, float]:
    """Effective rank of the exact val contexts and the Lipschitz estimate at sampled ones."""
    contexts = block_contexts(block, val_embeddings, block.initial_context)
    value, dims, percent = effective_rank(contexts)
    figures = {"iteration": iteration, "val_effective_rank": value, "val_rank_dims": dims,
               "val_effective_rank_percent": percent,
               "val_context_norm": float(contexts.norm(dim=1).mean())}
    if not lipschitz:
        return figures
    picks = torch.randperm(len(contexts), generator=generator)[:config.lipschitz_samples]
    previous = shifted(contexts, block.initial_context)[picks]
    with torch.enable_grad():
        lip_max, lip_mean = lipschitz_estimate(lambda c: block(c, val_embeddings[picks]),
                                               previous, generator)
    return {**figures, "lipschitz_max": lip_max, "lipschitz_mean": lip_mean}


def block_slices(num_blocks: int, tokens_per_block: int, block_data: str,
                 available: int) -> list[slice]:
    """Each block's training tokens: its own slice [i*n, (i+1)*n) (`split`, the seeds'
    finding), or all of [0, num_blocks*n) for every block (`all`, their ablation)."""
    if block_data not in BLOCK_DATA:
        raise NewllmError(f"phase1_context.block_data must be one of "
                          f"{', '.join(BLOCK_DATA)}, got {block_data!r}.")
    needed = num_blocks * tokens_per_block
    if needed > available:
        raise NewllmError(f"phase1_context needs {num_blocks} x {tokens_per_block} = {needed} "
                          f"train tokens but the train split has {available}; lower "
                          "phase1_context.tokens_per_block.")
    if block_data == "all":
        return [slice(0, needed)] * num_blocks
    return [slice(i * tokens_per_block, (i + 1) * tokens_per_block) for i in range(num_blocks)]


def train_context_blocks(model: CVFPLM, train_ids: torch.Tensor, val_ids: torch.Tensor,
                         config: Phase1Config, *, tokens_per_block: int, block_data: str,
                         init_context: str, generator: torch.Generator
                         ) -> list[dict[str, float]]:
    """Phase 1 for every block of `model` in turn; one record per block and iteration.

    `init_context: inherit` starts block i (in training and at the start of every stream)
    from block i-1's last training context instead of zeros (seeds/003's ablation)."""
    if init_context not in INIT_CONTEXTS:
        raise NewllmError(f"phase1_context.init_context must be one of {', '.join(INIT_CONTEXTS)}, "
                          f"got {init_context!r}.")
    slices = block_slices(model.config.num_blocks, tokens_per_block, block_data,
                          len(train_ids))
    with torch.no_grad():
        val_embeddings = model.embed(val_ids)
    records, carried = [], None
    for number, (block, rows) in enumerate(zip(model.context_blocks, slices, strict=True)):
        if init_context == "inherit" and carried is not None:
            if block.context_dim != len(carried):
                raise NewllmError("phase1_context.init_context inherit needs equal context_dim.")
            block.initial_context.copy_(carried)
        with torch.no_grad():
            embeddings = model.embed(train_ids[rows])
        history, last = train_block(block, embeddings, val_embeddings, config, generator,
                                    desc=f"phase1 block {number}")
        carried = last[-1].detach()
        records += [{"block": number, **record} for record in history]
    return records
