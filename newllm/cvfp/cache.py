"""phase2-prep-cache's output: every block's contexts for a stream, in chunked files.

A cache folder holds `index.json` and, per split, files `<split>_00000.safetensors`, ...
each with `contexts` [T, layers, num_blocks * context_dim] (per layer the blocks' contexts
concatenated; the last layer is what the recurrence carries) and the `token_ids` [T] they
were computed for. Position t holds the contexts after reading token t.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from newllm.core.artifacts import load_artifact, save_artifact, write_json
from newllm.core.errors import NewllmError
from newllm.cvfp.model import CVFPLM
from newllm.cvfp.recurrence import chunked_contexts, compile_cpu_kernel, uses_cpu_kernel

CACHE_KIND = "cvfp-context-cache"
INDEX_FILE = "index.json"


@dataclass
class SplitStats:
    tokens: int
    seconds: float
    chunks: int
    sweeps_per_window: float | None  # picard only

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def write_cache(folder: Path, model: CVFPLM, streams: dict[str, torch.Tensor], *,
                chunk_tokens: int, cache_dtype: torch.dtype, method: str,
                compute_dtype: torch.dtype, device: torch.device, tolerance: float,
                provenance: dict[str, Any]) -> dict[str, SplitStats]:
    """Write each stream's contexts chunk by chunk into `folder` (a fresh, atomic folder)."""
    index: dict[str, Any] = {"kind": CACHE_KIND, **provenance, "splits": {}}
    stats = {}
    if method == "sequential" and uses_cpu_kernel(device, compute_dtype):
        compile_cpu_kernel(compute_dtype)  # the tokens/s below are the kernel's, not numba's
    for split, token_ids in streams.items():
        files, sweeps, began = [], [], time.perf_counter()
        chunks = chunked_contexts(model, token_ids, chunk_tokens=chunk_tokens, method=method,
                                  compute_dtype=compute_dtype, device=device,
                                  tolerance=tolerance, desc=f"prep-cache {split}")
        for number, chunk in enumerate(chunks):
            name = f"{split}_{number:05d}.safetensors"
            end = chunk.start + len(chunk.contexts)
            save_artifact(folder / name, {"contexts": chunk.contexts.to(cache_dtype),
                                          "token_ids": token_ids[chunk.start:end].clone()},
                          kind=CACHE_KIND, stage="phase2-prep-cache",
                          params=provenance["params"], base=provenance["base"],
                          extra={"split": split, "start": chunk.start,
                                 "blocks_hash": provenance["blocks_hash"]})
            files.append({"file": name, "start": chunk.start, "tokens": end - chunk.start})
            sweeps += chunk.sweeps
        seconds = time.perf_counter() - began
        stats[split] = SplitStats(len(token_ids), seconds, len(files),
                                  sum(sweeps) / len(sweeps) if sweeps else None)
        index["splits"][split] = {"tokens": len(token_ids), "files": files}
    write_json(folder / INDEX_FILE, index)
    return stats


def read_index(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise NewllmError(f"{path} does not exist; expected a phase2-prep-cache folder "
                          "(run phase2-prep-cache).")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        index = None
    if not isinstance(index, dict) or index.get("kind") != CACHE_KIND:
        raise NewllmError(f"{path} is not a phase2-prep-cache index; re-run phase2-prep-cache.")
    return index


def load_cache(folder: str | Path, split: str, blocks_hash: str, base: dict[str, Any],
               max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts [N, L, D] float32, token_ids [N]) of the first `max_tokens` of a split,
    checking the cache was made by these context blocks from this base."""
    folder = Path(folder)
    index = read_index(folder)
    if index.get("blocks_hash") != blocks_hash:
        raise NewllmError(f"{folder} was cached from other context blocks than the ones given "
                          "(blocks hash differs); re-run phase2-prep-cache on them.")
    if split not in index["splits"]:
        raise NewllmError(f"{folder} holds no '{split}' split; re-run phase2-prep-cache.")
    entry = index["splits"][split]
    if max_tokens is not None and max_tokens > entry["tokens"]:
        raise NewllmError(f"{folder} caches {entry['tokens']} {split} tokens, fewer than the "
                          f"{max_tokens} asked for; raise phase2_prep_cache.{split}_tokens.")
    contexts, token_ids, held = [], [], 0
    for item in entry["files"]:
        if max_tokens is not None and held >= max_tokens:
            break
        artifact = load_artifact(folder / item["file"], kind=CACHE_KIND, base=base)
        contexts.append(artifact["contexts"].float())
        token_ids.append(artifact["token_ids"])
        held += len(artifact["token_ids"])
    return torch.cat(contexts)[:max_tokens], torch.cat(token_ids)[:max_tokens]
