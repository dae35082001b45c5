"""Corpora: read documents, split them by document, tokenize, and read prepared splits back.

A corpus is read strictly: a file that is not UTF-8 or a JSONL line that is not a JSON
object with the text field is a one-line error naming the file (and line, or byte offset),
never a silently replaced character.

A prepared split is `<split>.safetensors` (token ids of all documents back to
back, `input_ids` [N] int32, and `doc_offsets` [D+1] int64 marking where each
document starts) plus `<split>.jsonl` with the raw text of each document, which
word perplexity and bits per byte need.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newllm.core.artifacts import Artifact, load_artifact
from newllm.core.errors import NewllmError

SPLITS = ("train", "val", "test")
PREPARED_KIND = "prepared-split"
WIKI_FILE = "summaries_en-us.json"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def read_utf8(path: Path, what: str) -> str:
    """The text of `path`; NewllmError naming the file and the first bad byte if not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NewllmError(f"{path}: not valid UTF-8 (byte offset {exc.start}); expected "
                          f"{what} in UTF-8.") from None


def jsonl_lines(path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line of a JSONL file."""
    rows = []
    # split on "\n" only: str.splitlines() would also cut at U+2028 and other separators,
    # which ensure_ascii=False JSON keeps raw inside strings
    for number, line in enumerate(read_utf8(path, what).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise NewllmError(f"{path}:{number}: not valid JSON ({exc.msg}); expected {what}, "
                              "one JSON object per line.") from None
    return rows


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    """Each line of a JSONL corpus is a document: a JSON object with its text in `text_field`."""
    docs = []
    for number, row in jsonl_lines(path, "a JSONL corpus"):
        if not isinstance(row, dict):
            raise NewllmError(f"{path}:{number}: expected a JSON object with a "
                              f'"{text_field}" field, got {type(row).__name__}.')
        if text_field not in row:
            raise NewllmError(f'{path}:{number}: has no "{text_field}" field (keys: '
                              f"{', '.join(map(str, row)) or 'none'}); set "
                              "prepare_data.text_field.")
        text = row[text_field]
        if not isinstance(text, str):
            raise NewllmError(f'{path}:{number}: "{text_field}" is a {type(text).__name__}, '
                              "expected a string.")
        title = row.get("title")
        if text.strip():
            docs.append(Document(title if isinstance(title, str) else f"{path.name}:{number}",
                                 text.strip()))
    return docs


def _wiki_documents(path: Path) -> list[Document]:
    try:
        data = json.loads(read_utf8(path, "a wiki summaries JSON"))
    except json.JSONDecodeError as exc:
        raise NewllmError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(data, dict):
        raise NewllmError(f"{path}: expected a JSON object of articles "
                          "{title: {extract: ...}}.")
    docs = []
    for title in sorted(data):
        entry = data[title]
        text = entry.get("extract") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text.strip():
            docs.append(Document(str(title), text.strip()))
    return docs


def _text_documents(files: list[Path]) -> list[Document]:
    """Each paragraph (blank-line separated) of each text file is a document."""
    docs = []
    for path in sorted(files):
        paragraphs = re.split(r"\n\s*\n", read_utf8(path, "text"))
        docs += [Document(f"{path.name}#{i}", p.strip()) for i, p in enumerate(paragraphs)
                 if p.strip()]
    return docs


def _dataset_documents(path: Path, text_field: str) -> list[Document]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise NewllmError(f"{path}: could not load the saved dataset ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); expected "
                          "a folder written by datasets' save_to_disk.") from None
    parts: list[Dataset] = list(loaded.values()) if isinstance(loaded, DatasetDict) else [loaded]
    docs = []
    for part_index, part in enumerate(parts):
        if text_field not in part.column_names:
            raise NewllmError(f"{path}: the dataset has no column '{text_field}' "
                              f"(columns: {', '.join(part.column_names)}); set "
                              "prepare_data.text_field.")
        for row, text in enumerate(part[text_field]):
            if isinstance(text, str) and text.strip():
                docs.append(Document(f"{part_index}:{row}", text.strip()))
    return docs


def read_corpus(corpus: str | Path, text_field: str = "text") -> list[Document]:
    """Documents from a wiki-summaries JSON, a JSONL file, text files, or a `datasets`
    dataset on disk."""
    path = Path(corpus)
    if not path.exists():
        raise NewllmError(f"prepare_data.corpus '{path}' does not exist.")
    if path.is_file() and path.suffix == ".json":
        docs = _wiki_documents(path)
    elif path.is_file() and path.suffix == JSONL_SUFFIX:
        docs = _jsonl_documents(path, text_field)
    elif path.is_file():
        docs = _text_documents([path])
    elif (path / WIKI_FILE).exists():
        docs = _wiki_documents(path / WIKI_FILE)
    elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        docs = _dataset_documents(path, text_field)
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
        docs = _text_documents([p for p in files if p.suffix in TEXT_SUFFIXES])
        for jsonl in (p for p in files if p.suffix == JSONL_SUFFIX):
            docs += _jsonl_documents(jsonl, text_field)
    if not docs:
        raise NewllmError(f"prepare_data.corpus '{path}' contains no documents (expected a "
                          f"{WIKI_FILE}, .jsonl, .txt/.md files or a dataset saved with "
                          "save_to_disk).")
    return docs


def split_documents(docs: list[Document], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, list[Document]]:
    """Shuffle documents with `seed` and cut them into train/val/test (each non-empty)."""
    if len(docs) < 3:
        raise NewllmError(f"the corpus has {len(docs)} document(s); at least 3 are needed "
                          "for train/val/test.")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    n_test = max(1, round(len(docs) * test_fraction))
    if n_val + n_test >= len(docs):
        raise NewllmError(f"prepare_data.val_fraction + test_fraction leave no training "
                          f"documents out of {len(docs)}.")
    shuffled = [docs[i] for i in order]
    return {"val": shuffled[:n_val], "test": shuffled[n_val:n_val + n_test],
            "train": shuffled[n_val + n_test:]}


def tokenize_documents(tokenizer: Any, docs: list[Document],
                       batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of all documents back to back (no special tokens) and document offsets."""
    # One int32 array per document: a flat Python list of ints would take ~9x the memory
    # of the ids themselves (28-byte int objects plus 8-byte pointers) on a large corpus.
    chunks: list[np.ndarray] = []
    lengths = [0]
    for start in range(0, len(docs), batch_size):
        texts = [d.text for d in docs[start:start + batch_size]]
        for piece in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            chunks.append(np.fromiter(piece, dtype=np.int32, count=len(piece)))
            lengths.append(len(piece))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    offsets = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), dim=0)
    return torch.from_numpy(ids), offsets


@dataclass
class PreparedSplit:
    """A tokenized split with its raw documents."""

    input_ids: torch.Tensor  # [N] int32
    doc_offsets: torch.Tensor  # [D+1] int64
    texts: list[str]
    artifact: Artifact

    def documents(self, max_tokens: int | None = None) -> tuple[list[torch.Tensor], list[str]]:
        """Whole documents, in order, until `max_tokens` document tokens are reached."""
        ids, texts, total = [], [], 0
        for i, text in enumerate(self.texts):
            begin, end = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
            if end == begin:
                continue
            if max_tokens is not None and total >= max_tokens:
                break
            ids.append(self.input_ids[begin:end].long())
            texts.append(text)
            total += end - begin
        return ids, texts


def load_split(prepared_dir: str | Path, split: str,
               base: dict[str, Any] | None = None) -> PreparedSplit:
    """Read a prepared split, checking it was tokenized with `base`'s tokenizer."""
    folder = Path(prepared_dir)
    artifact = load_artifact(folder / f"{split}.safetensors", kind=PREPARED_KIND, base=base)
    text_path = folder / f"{split}.jsonl"
    if not text_path.is_file():
        raise NewllmError(f"{text_path} does not exist; re-run prepare-data.")
    texts = []
    for number, row in jsonl_lines(text_path, "prepare-data's documents"):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise NewllmError(f'{text_path}:{number}: has no "text" string; it was not written '
                              "by prepare-data (re-run prepare-data).")
        texts.append(row["text"])
    offsets = artifact["doc_offsets"]
    if len(texts) != len(offsets) - 1:
        raise NewllmError(f"{text_path} has {len(texts)} documents but {artifact.path} has "
                          f"{len(offsets) - 1}; re-run prepare-data.")
    return PreparedSplit(artifact["input_ids"], offsets, texts, artifact)
