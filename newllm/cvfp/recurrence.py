"""Running the frozen context blocks over a token stream with exact RNN semantics.

Every block's context is carried across the whole stream, one token at a time, from the
blocks' initial contexts. Three ways to get the same contexts:

- `naive_contexts`: the seeds' loop, one `CVFPLM.step` per token (the reference).
- `sequential`: per chunk of tokens, the half of every layer that reads only the token,
  W_e e_t + b, is one matmul for the whole chunk; what must stay sequential,
  c <- c + ReLU(W_c c + (W_e e_t + b)), runs as a compiled loop with one BLAS
  matrix-vector product per layer and token, each block on its own core (numba on the
  CPU; a TorchScript loop on other devices, where numba does not run).
- `picard`: a chunk-parallel fixed-point solve. Guess every context of a window, then
  sweep c_t <- f(c_{t-1}, e_t) for all t of the window at once (one matmul per layer),
  until the largest change is below `tolerance`. After k sweeps the first k positions are
  exact whatever the map, so it always ends (at most window-length sweeps); it is fast
  only when f is close to a contraction in c (see `lipschitz_estimate`).

Contexts leave as float32 [T, layers, num_blocks * context_dim] per chunk (per layer the
blocks' contexts concatenated, as the TokenBlock reads them); only one chunk's tensors live
on the device at a time, under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from newllm.core.runtime import progress, single_thread
from newllm.cvfp.model import CVFPLM, ContextBlock

METHODS = ("sequential", "picard")
PICARD_WINDOW = 256  # positions solved together; at most this many sweeps per window


@dataclass
class StackedBlocks:
    """Every block's layers stacked for the fast paths (blocks must share context_dim)."""

    context_weights: torch.Tensor  # [L, B, d, d], transposed: c [B, 1, d] @ W -> [B, 1, d]
    embedding_weights: torch.Tensor  # [L, B, E, d]
    biases: torch.Tensor  # [L, B, d]
    initial: torch.Tensor  # [B, d]
    normalize: bool  # LayerNorm after each layer (CVFPConfig.context_norm)

    @classmethod
    def of(cls, blocks: Sequence[ContextBlock], device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32) -> StackedBlocks:
        def stack(get: Callable) -> torch.Tensor:
            return torch.stack([torch.stack([get(layer) for layer in block.layers])
                                for block in blocks], dim=1).detach()

        return cls(
            stack(lambda layer: layer.context_weight().t()).to(device, dtype),
            stack(lambda layer: layer.embedding_weight().t()).to(device, dtype),
            stack(lambda layer: layer.linear.bias).to(device, dtype),
            torch.stack([block.initial_context for block in blocks]).to(device, dtype),
            blocks[0].normalize,
        )

    def embedding_parts(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[T, E] -> W_e e + b for every layer and block: [T, L, B, d]."""
        return torch.einsum("te,lbed->tlbd", embeddings, self.embedding_weights) + self.biases


@torch.jit.script
def _scan_block(context_weights: torch.Tensor, parts: torch.Tensor, context: torch.Tensor,
                normalize: bool) -> torch.Tensor:
    """One block: context_weights [L, d, d] (c @ W), parts [T, L, d], context [d]."""
    out = torch.empty_like(parts)
    shape = [parts.shape[-1]]
    for t in range(parts.shape[0]):
        for layer in range(parts.shape[1]):
            context = context + torch.relu(torch.addmv(parts[t, layer],
                                                       context_weights[layer].t(), context))
            if normalize:
                context = torch.layer_norm(context, shape)
            out[t, layer] = context
    return out


@torch.jit.script
def sequential_scan(context_weights: torch.Tensor, parts: torch.Tensor,
                    context: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The recurrence over one chunk: parts [T, L, B, d], context [B, d] -> [T, L, B, d].
    Blocks are independent, so each runs on its own inter-op thread."""
    futures: list[torch.jit.Future[torch.Tensor]] = []
    for block in range(parts.shape[2]):
        futures.append(torch.jit.fork(_scan_block, context_weights[:, block],
                                      parts[:, :, block], context[block], normalize))
    return torch.stack([torch.jit.wait(future) for future in futures], dim=2)


@numba.njit(parallel=True, cache=True)
def _scan_cpu(weights: np.ndarray, parts: np.ndarray, initial: np.ndarray, normalize: bool,
              out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """The recurrence over one chunk on the CPU: weights [B, L, d, d] (W_c, so W_c @ c),
    parts [T, L, B, d], initial [B, d] -> out [T, L, B, d]. Blocks run in parallel; the
    elementwise part accumulates in float64, so it rounds no worse than torch's."""
    num_blocks, num_layers, dim = weights.shape[0], weights.shape[1], weights.shape[2]
    for block in numba.prange(num_blocks):
        context = initial[block].copy()
        for t in range(parts.shape[0]):
            for layer in range(num_layers):
                update = weights[block, layer] @ context  # the only O(d^2) step: BLAS gemv
                part = parts[t, layer, block]
                total = 0.0
                for i in range(dim):
                    context[i] += max(update[i] + part[i], 0.0)
                    total += context[i]
                if normalize:  # LayerNorm without affine, eps as torch's default
                    mean = total / dim
                    variance = 0.0
                    for i in range(dim):
                        variance += (context[i] - mean) ** 2
                    scale = 1.0 / np.sqrt(variance / dim + 1e-5)
                    for i in range(dim):
                        context[i] = (context[i] - mean) * scale
                out[t, layer, block] = context


def cpu_scan(context_weights: torch.Tensor, parts: torch.Tensor, context: torch.Tensor,
             normalize: bool) -> torch.Tensor:
    """`sequential_scan` on the CPU through the compiled kernel: same shapes, same contexts."""
    weights = np.ascontiguousarray(context_weights.permute(1, 0, 3, 2).numpy())
    out = np.empty(tuple(parts.shape), dtype=weights.dtype)
    threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(parts.shape[2], torch.get_num_threads(), threads)))
    try:
        _scan_cpu(weights, parts.contiguous().numpy(), context.contiguous().numpy(),
                  normalize, out)
    finally:
        numba.set_num_threads(threads)
    return torch.from_numpy(out)


def uses_cpu_kernel(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `sequential` runs the numba kernel (CPU, float32/64) or the TorchScript loop."""
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)


def compile_cpu_kernel(dtype: torch.dtype = torch.float32) -> None:
    """Compile the CPU kernel for `dtype` now (or load it from numba's cache), so that a
    timing taken next leaves the one-off compilation out."""
    one = torch.zeros(1, 1, 1, 1, dtype=dtype)
    cpu_scan(one, one, one[0, 0], True)


def apply_layers(context_weights: torch.Tensor, parts: torch.Tensor,
                 previous: torch.Tensor, normalize: bool) -> torch.Tensor:
    """f for many positions at once: previous [T, B, d] (each position's c_{t-1}) -> every
    layer's output [T, L, B, d]."""
    outputs = []
    c = previous
    for layer in range(parts.shape[1]):
        c = c + torch.relu(parts[:, layer] + torch.einsum("tbd,bde->tbe", c,
                                                          context_weights[layer]))
        if normalize:
            c = F.layer_norm(c, c.shape[-1:])
        outputs.append(c)
    return torch.stack(outputs, dim=1)


def picard_scan(context_weights: torch.Tensor, parts: torch.Tensor, context: torch.Tensor,
                normalize: bool, tolerance: float,
                window: int = PICARD_WINDOW) -> tuple[torch.Tensor, list[int]]:
    """The same contexts as `sequential_scan` by Jacobi sweeps over windows of positions.
    Returns the contexts and the sweeps each window took."""
    out = torch.empty_like(parts)
    sweeps = []
    for start in range(0, parts.shape[0], window):
        piece = parts[start:start + window]
        guess = context.expand(len(piece), -1, -1)  # every c_t guessed as the carried context
        # sweep k makes position k-1 exact, so len(piece) sweeps always suffice; a sweep
        # that changes nothing (to the tolerance) certifies every position earlier
        done = 0
        while done < len(piece):
            previous = torch.cat([context[None], guess[:-1]])
            layers = apply_layers(context_weights, piece, previous, normalize)
            change = (layers[:, -1] - guess).abs().max()
            guess, done = layers[:, -1], done + 1
            if change <= tolerance * (1.0 + guess.abs().max()):
                break
        sweeps.append(done)
        out[start:start + len(piece)] = layers
        context = guess[-1]
    return out, sweeps


@dataclass
class Chunk:
    start: int  # position of the chunk's first token in the stream
    contexts: torch.Tensor  # [T, L, B*d] float32 on the CPU
    sweeps: list[int]  # picard: sweeps per window; empty for sequential


def scan(blocks: StackedBlocks, parts: torch.Tensor, context: torch.Tensor, method: str,
         tolerance: float = 1e-6) -> tuple[torch.Tensor, list[int]]:
    """One chunk: parts [T, L, B, d] from `context` [B, d] -> ([T, L, B, d], picard sweeps)."""
    if method == "sequential":
        if uses_cpu_kernel(parts.device, parts.dtype):
            return cpu_scan(blocks.context_weights, parts, context, blocks.normalize), []
        if parts.device.type != "cpu":
            return sequential_scan(blocks.context_weights, parts, context, blocks.normalize), []
        with single_thread():
            return sequential_scan(blocks.context_weights, parts, context, blocks.normalize), []
    return picard_scan(blocks.context_weights, parts, context, blocks.normalize, tolerance)


@torch.no_grad()
def chunked_contexts(model: CVFPLM, token_ids: torch.Tensor, *, chunk_tokens: int,
                     method: str = "sequential", compute_dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", tolerance: float = 1e-6,
                     desc: str = "prep-cache") -> Iterator[Chunk]:
    """The contexts of a 1-D stream of token ids (kept on the CPU), chunk by chunk: one
    chunk's tensors at a time go to `device`; the context is carried between chunks."""
    blocks = StackedBlocks.of(model.context_blocks, device, compute_dtype)
    context = blocks.initial
    for start in progress(range(0, len(token_ids), chunk_tokens), desc=desc, unit="chunk"):
        ids = token_ids[start:start + chunk_tokens].to(model.embedding.device)
        parts = blocks.embedding_parts(model.embed(ids).to(device, compute_dtype))
        out, sweeps = scan(blocks, parts, context, method, tolerance)
        context = out[-1, -1]
        yield Chunk(start, out.reshape(len(ids), out.shape[1], -1).float().cpu(), sweeps)
        del ids, parts, out  # the next chunk starts from `context` alone


@torch.no_grad()
def block_contexts(block: ContextBlock, embeddings: torch.Tensor, context: torch.Tensor,
                   chunk_tokens: int = 8192) -> torch.Tensor:
    """One block's final-layer contexts over normalized embeddings [T, E] from `context`:
    [T, d] (phase 1's sequential pass and its validation contexts)."""
    blocks = StackedBlocks.of([block], embeddings.device)
    context, pieces = context[None], []
    for start in range(0, len(embeddings), chunk_tokens):
        parts = blocks.embedding_parts(embeddings[start:start + chunk_tokens])
        out, _ = scan(blocks, parts, context, "sequential")
        pieces.append(out[:, -1, 0])
        context = out[-1, -1]
    return torch.cat(pieces)


def stream_contexts(model: CVFPLM, token_ids: torch.Tensor, **options) -> torch.Tensor:
    """All contexts of a (short) stream in memory: [T, L, B*d]."""
    return torch.cat([chunk.contexts for chunk in chunked_contexts(model, token_ids,
                                                                   **options)])


@torch.no_grad()
def naive_contexts(model: CVFPLM, token_ids: torch.Tensor) -> torch.Tensor:
    """The seeds' per-token loop (the reference): [T] -> [T, L, B*d]."""
    contexts = model.initial_contexts()
    rows = []
    for token in token_ids:
        contexts, per_layer = model.step(contexts, model.embed(token.view(1))[0])
        rows.append(torch.stack(per_layer))
    return torch.stack(rows)
