"""phase2-prep-cache: every context of the frozen blocks over the train and val streams.

Exact RNN semantics: each split is one stream [sep, doc_1, sep, doc_2, ...] read from its
first token with every block's context carried throughout, as at inference. Chunked: one
chunk of tokens at a time on the device, one file per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from newllm.core.artifacts import atomic_dir, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.params import as_dict, param
from newllm.core.runtime import resolve_dtype
from newllm.core.tokens import separator_token_id
from newllm.core.train import COMPUTE_DTYPES
from newllm.cvfp.cache import write_cache
from newllm.cvfp.checkpoint import blocks_hash, load_blocks, token_stream
from newllm.cvfp.recurrence import METHODS


@dataclass
class PrepCacheParams:
    group = "phase2_prep_cache"
    blocks: str = param("artifacts/cvfp/context_blocks.safetensors", "Phase-1 blocks artifact.")
    data: str = param("data/prepared", "Prepared data folder (from prepare-data).")
    train_tokens: int | None = param(12000, "Cache this many tokens from the start of the "
                                     "train stream (null = all of it).", min=2)
    val_tokens: int | None = param(5000, "Same for the val stream (null = all of it).",
                                   min=2)
    chunk_tokens: int = param(8192, "Tokens per chunk (and per cache file).", min=1)
    method: str = param("sequential", "sequential: the exact recurrence, token by token in a "
                        "scripted loop; picard: chunk-parallel fixed-point sweeps.",
                        choices=METHODS)
    tolerance: float = param(1e-6, "picard: stop sweeping when the largest change is below "
                             "this (relative to the largest context value).", min=0)
    cache_dtype: str = param("float32", "dtype of the stored contexts: float32 keeps the "
                             "recurrence's contexts exactly; float16 rounds them (~5e-4 relative).",
                             choices=("float32", "float16", "bfloat16"))
    compute_dtype: str = param("float32", "dtype of the recurrence.", choices=COMPUTE_DTYPES)
    out: str = param("artifacts/cvfp/context_cache", "Cache folder to write.", output="dir")
    metrics: str = param("metrics/cvfp/prep_cache.json", "Metrics JSON to write.", output="metrics")


@stage_command("phase2-prep-cache", BaseParams, PrepCacheParams,
               help="CVFP phase 2 prep: run the frozen context blocks over the train and val "
                    "streams with exact RNN semantics and store every block's contexts (every "
                    "layer's) in chunked safetensors files with an index.")
def phase2_prep_cache(base_params: BaseParams, params: PrepCacheParams) -> None:
    base = base_params.load()
    info = base.info.as_dict()
    embeddings = base.input_embeddings()
    model, _ = load_blocks(params.blocks, info, embeddings)
    separator = separator_token_id(base.tokenizer, base_params.separator_token)
    streams = {split: token_stream(params.data, split, separator, base.info.tokenizer_only(),
                                   limit)
               for split, limit in (("train", params.train_tokens),
                                    ("val", params.val_tokens))}
    provenance = {"params": as_dict(base_params, params), "base": info,
                  "blocks": params.blocks, "blocks_hash": blocks_hash(model),
                  "config": model.config.as_dict(), "separator_id": separator}
    with atomic_dir(params.out) as folder:
        stats = write_cache(folder, model, streams, chunk_tokens=params.chunk_tokens,
                            cache_dtype=resolve_dtype(params.cache_dtype), method=params.method,
                            compute_dtype=resolve_dtype(params.compute_dtype),
                            device=base.device, tolerance=params.tolerance,
                            provenance=provenance)
    metrics = {"method": params.method, "chunk_tokens": params.chunk_tokens,
               "cache_dtype": params.cache_dtype, "device": str(base.device)}
    for split, figures in stats.items():
        metrics.update({f"{split}_tokens": figures.tokens, f"{split}_chunks": figures.chunks,
                        f"{split}_seconds": figures.seconds,
                        f"{split}_tokens_per_second": figures.tokens_per_second,
                        f"{split}_picard_sweeps_per_window": figures.sweeps_per_window})
    write_metrics(params.metrics, metrics)
    for split, figures in stats.items():
        click.echo(f"{split}: {figures.tokens} tokens in {figures.chunks} chunks, "
                   f"{figures.tokens_per_second:,.0f} tokens/s ({params.method})")
