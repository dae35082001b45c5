"""extract-pairs: (hidden state at a layer, input embedding) for each ordinary vocabulary id."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch.nn.functional as F

from newllm.core.artifacts import atomic_dir, save_artifact, write_metrics
from newllm.core.base import BaseParams
from newllm.core.cli import stage_command
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze
from newllm.core.hidden import resolve_layer_index
from newllm.core.params import as_dict, param
from newllm.core.tokens import separator_token_id
from newllm.virtual_tokens import run_name
from newllm.virtual_tokens.pairs import (
    PAIRS_FILE,
    PAIRS_KIND,
    embedding_rows,
    extract_hidden,
    ordinary_token_ids,
    pairs_dir,
)


@dataclass
class ExtractPairsParams:
    group = "extract_pairs"
    hidden_index: int = param(-1, "Hidden state to take: an index of HF's hidden_states "
                              "(0 = embeddings, k = output of decoder layer k-1, L = final, "
                              "-1 = last), not a decoder layer index.")
    max_tokens: int | None = param(16384, "Take the first this many ordinary (non-special) "
                                   "vocabulary ids (null = all).", min=1)
    batch_size: int = param(256, "Tokens per forward pass.", min=1)
    after_separator: bool = param(True, "Read each token at the start of a document, after "
                                  "base.separator_token ([sep, token]), rather than alone.")
    out_dir: str = param("artifacts/pairs", "Output folder: writes "
                         "<out_dir>/layer<L>/pairs.safetensors (L = resolved layer).",
                         output="container")
    metrics_dir: str = param("metrics/extract_pairs", "Metrics folder: writes "
                             "<metrics_dir>/layer<L>.json.", output="container")


@stage_command("extract-pairs", BaseParams, ExtractPairsParams,
               help="For each of the first max_tokens ordinary vocabulary ids, feed [BOS, token] "
                    "to the frozen base and save the hidden state at hidden_index (X), the "
                    "token's input embedding (Y) and the ids. Special/added tokens are skipped.")
def extract_pairs(base_params: BaseParams, params: ExtractPairsParams) -> None:
    base = base_params.load()
    layer = resolve_layer_index(params.hidden_index, base.info.num_layers,
                                "extract_pairs.hidden_index")
    token_ids, special = ordinary_token_ids(
        base.tokenizer, base.model.get_input_embeddings().num_embeddings, params.max_tokens)
    if len(token_ids) == 0:
        raise NewllmError(f"base.model '{base_params.model}' has no ordinary (non-special) "
                          "vocabulary ids to extract.")
    prefix_id = (separator_token_id(base.tokenizer, base_params.separator_token)
                 if params.after_separator else None)
    prefix = base.tokenizer.convert_ids_to_tokens(prefix_id) if prefix_id is not None else None
    frozen = freeze(base.model)
    start = time.perf_counter()
    x = extract_hidden(base.model, token_ids, layer, prefix_id, params.batch_size, base.device)
    seconds = time.perf_counter() - start
    y = embedding_rows(base.model, token_ids)
    check_unchanged(base.model, frozen, "extract-pairs")

    with atomic_dir(pairs_dir(params.out_dir, layer)) as out:
        save_artifact(out / PAIRS_FILE, {"X": x, "Y": y, "token_ids": token_ids},
                      kind=PAIRS_KIND, stage="extract-pairs", params=as_dict(base_params, params),
                      base=base.info.as_dict(),
                      extra={"layer_index": layer, "num_layers": base.info.num_layers,
                             "prefix_token_id": prefix_id, "prefix_token": prefix,
                             "skipped_special_ids": special})
    metrics = {
        "pairs": len(token_ids), "hidden_size": x.shape[1], "layer_index": layer,
        "prefix_token": prefix or "", "skipped_special": len(special), "seconds": round(seconds, 2),
        "tokens_per_s": round(len(token_ids) / seconds, 1),
        "x_norm_mean": x.norm(dim=1).mean().item(), "y_norm_mean": y.norm(dim=1).mean().item(),
        "xy_cosine_mean": F.cosine_similarity(x, y, dim=1).mean().item(),
    }
    write_metrics(Path(params.metrics_dir) / f"{run_name(layer)}.json", metrics)
    click.echo(f"layer {layer}: {len(token_ids)} pairs (d={x.shape[1]}, read after {prefix}, "
               f"{len(special)} special ids skipped) in {seconds:.1f}s, "
               f"{len(token_ids) / seconds:.0f} tokens/s")
