"""prepare-data: split a corpus by document and tokenize it with the base tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from newllm.core.artifacts import atomic_dir, save_artifact, write_metrics
from newllm.core.base import BaseParams, load_tokenizer
from newllm.core.cli import stage_command
from newllm.core.data import (
    PREPARED_KIND,
    count_bytes,
    count_words,
    read_corpus,
    split_documents,
    tokenize_documents,
)
from newllm.core.params import as_dict, param


@dataclass
class PrepareDataParams:
    group = "prepare_data"
    corpus: str = param("data/assets/wiki", "Corpus: a wiki summaries JSON (or its folder), a "
                        ".jsonl file (one JSON object per line), a folder of .txt/.md/.jsonl "
                        "files, or a datasets dataset saved to disk.")
    text_field: str = param("text", "Text field of a .jsonl corpus's objects, or text column "
                            "of a datasets dataset.")
    val_fraction: float = param(0.05, "Share of documents in the val split.", min=0.0, max=0.5)
    test_fraction: float = param(0.05, "Share of documents in the test split.", min=0.0, max=0.5)
    seed: int = param(0, "Seed of the document shuffle.", min=0)
    out: str = param("data/prepared", "Output folder (train/val/test .safetensors + .jsonl).",
                     output="dir")
    metrics: str = param("metrics/prepare_data.json", "Metrics JSON to write.", output="metrics")


@stage_command("prepare-data", BaseParams, PrepareDataParams,
               help="Split the corpus by document (seeded) and tokenize train/val/test with the "
                    "base tokenizer, keeping document boundaries and the raw text.")
def prepare_data(base: BaseParams, params: PrepareDataParams) -> None:
    tokenizer, info = load_tokenizer(base.model)
    docs = read_corpus(params.corpus, params.text_field)
    splits = split_documents(docs, params.val_fraction, params.test_fraction, params.seed)
    metrics: dict[str, int] = {}
    with atomic_dir(params.out) as out:
        for name, split_docs in splits.items():
            input_ids, offsets = tokenize_documents(tokenizer, split_docs)
            counts = {"documents": len(split_docs), "tokens": len(input_ids),
                      "words": sum(count_words(d.text) for d in split_docs),
                      "bytes": sum(count_bytes(d.text) for d in split_docs)}
            save_artifact(out / f"{name}.safetensors",
                          {"input_ids": input_ids, "doc_offsets": offsets},
                          kind=PREPARED_KIND, stage="prepare-data",
                          params=as_dict(base, params), base=info.tokenizer_only(),
                          extra={"split": name, **counts})
            lines = [json.dumps({"title": d.title, "text": d.text}, ensure_ascii=False)
                     for d in split_docs]
            (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            metrics.update({f"{name}_{k}": v for k, v in counts.items()})
            click.echo(f"{name}: {counts['documents']} documents, {counts['tokens']} tokens, "
                       f"{counts['words']} words, {counts['bytes']} bytes")
    write_metrics(Path(params.metrics), metrics)
