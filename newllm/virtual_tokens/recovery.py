"""How well vectors stand for tokens: MSE, cosine, and nearest-neighbour token recovery.

Recovery searches the full input-embedding matrix (every vocabulary row) by
cosine similarity: a vector recovers token t at k if t's row is among the k
rows most similar to it (seeds/002 §4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 1024  # similarity rows at a time: 1024 x 49152 floats is 200 MB


def nearest_tokens(vectors: torch.Tensor, embeddings: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` embedding rows most cosine-similar to each vector: (ids [n, k], sims [n, k])."""
    table = F.normalize(embeddings.float(), dim=-1)
    k = min(k, len(table))
    ids, sims = [], []
    for start in range(0, len(vectors), CHUNK_ROWS):
        queries = F.normalize(vectors[start:start + CHUNK_ROWS].float(), dim=-1)
        best = (queries @ table.T).topk(k, dim=-1)
        ids.append(best.indices)
        sims.append(best.values)
    if not ids:
        return torch.empty(0, k, dtype=torch.int64), torch.empty(0, k)
    return torch.cat(ids), torch.cat(sims)


def topk_recovery(vectors: torch.Tensor, token_ids: torch.Tensor, embeddings: torch.Tensor,
                  ks: tuple[int, ...]) -> dict[int, float]:
    """Share of vectors whose own token is among their k nearest embedding rows, per k."""
    found, _ = nearest_tokens(vectors, embeddings, max(ks))
    hits = found == token_ids.to(found.device)[:, None]  # [n, max k]; at most one hit a row
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def mapping_metrics(vectors: torch.Tensor, targets: torch.Tensor, token_ids: torch.Tensor,
                    embeddings: torch.Tensor, topk: int) -> dict[str, float]:
    """MSE and mean cosine against the target embeddings, and top-1 / top-k token recovery."""
    recovered = topk_recovery(vectors, token_ids, embeddings, (1, topk))
    return {
        "mse": F.mse_loss(vectors.float(), targets.float()).item(),
        "cosine": F.cosine_similarity(vectors.float(), targets.float(), dim=-1).mean().item(),
        "top1": recovered[1],
        f"top{topk}": recovered[topk],
    }
