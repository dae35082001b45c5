"""The CLI end to end on the tiny model: params precedence, prepare-data, eval-ppl, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error, make_corpus_texts

from newllm.core.data import Document, load_split, tokenize_documents


def _prepare(run_cli, tiny_model, corpus, out, *extra):
    """prepare-data into `out` (run from its parent, with relative paths as dvc does)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return run_cli("prepare-data", "--model", str(tiny_model), "--corpus", str(corpus),
                   "--val-fraction", "0.2", "--test-fraction", "0.1", "--out", out.name,
                   "--metrics", "m.json", *extra, cwd=out.parent)


def test_prepare_data_splits_by_document_deterministically(run_cli, tiny_model, mini_corpus,
                                                           tmp_path):
    first, second = tmp_path / "a" / "prepared", tmp_path / "b" / "prepared"
    assert _prepare(run_cli, tiny_model, mini_corpus, first).code == 0
    assert _prepare(run_cli, tiny_model, mini_corpus, second).code == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    corpus = json.loads(mini_corpus.read_text())
    titles = {}
    for split in ("train", "val", "test"):
        for suffix in ("safetensors", "jsonl"):
            a, b = first / f"{split}.{suffix}", second / f"{split}.{suffix}"
            assert a.read_bytes() == b.read_bytes()
        rows = [json.loads(x) for x in (first / f"{split}.jsonl").open()]
        titles[split] = {row["title"] for row in rows}
        prepared = load_split(first, split)
        # document boundaries: offsets run from 0 to the end, strictly increasing, and the ids
        # between two offsets are exactly the tokenization of that document's own text
        offsets = prepared.doc_offsets.tolist()
        assert offsets[0] == 0 and offsets[-1] == len(prepared.input_ids)
        assert all(a < b for a, b in itertools.pairwise(offsets))
        assert prepared.texts == [corpus[row["title"]]["extract"] for row in rows]
        for i, text in enumerate(prepared.texts):
            assert prepared.input_ids[offsets[i]:offsets[i + 1]].tolist() == \
                tokenizer(text, add_special_tokens=False)["input_ids"], (split, i)
    assert not (titles["train"] & titles["val"]) and not (titles["val"] & titles["test"])
    assert sum(len(t) for t in titles.values()) == 40
    assert (len(titles["val"]), len(titles["test"])) == (8, 4)
    metrics = json.loads((tmp_path / "a" / "m.json").read_text())
    assert metrics["val_documents"] == 8 and metrics["val_tokens"] > 0
    # another seed, another split
    third = tmp_path / "c" / "prepared"
    assert _prepare(run_cli, tiny_model, mini_corpus, third, "--seed", "1").code == 0
    assert {json.loads(x)["title"] for x in (third / "val.jsonl").open()} != titles["val"]


def test_prepare_data_keeps_tokens_of_each_document(run_cli, tiny_model, prepared_tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    split = load_split(prepared_tiny, "val")
    docs, texts = split.documents()
    for ids, text in zip(docs, texts, strict=True):
        assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prepare_data_reads_text_files_and_saved_datasets(run_cli, tiny_model, tmp_path):
    from datasets import Dataset

    texts = [f"Paragraph number {i} talks about rivers and bridges." for i in range(12)]
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("\n\n".join(texts[:6]))
    (text_dir / "b.md").write_text("\n\n".join(texts[6:]))
    assert _prepare(run_cli, tiny_model, text_dir, tmp_path / "t" / "prepared").code == 0
    Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    result = _prepare(run_cli, tiny_model, tmp_path / "ds", tmp_path / "d" / "prepared",
                      "--text-field", "body")
    assert result.code == 0, result.err
    for out in (tmp_path / "t", tmp_path / "d"):
        metrics = json.loads((out / "m.json").read_text())
        assert metrics["train_documents"] + metrics["val_documents"] + \
            metrics["test_documents"] == 12


def test_prepare_data_reads_jsonl_and_keeps_any_character_of_the_text(run_cli, tiny_model,
                                                                       tmp_path):
    # U+2028, U+0085 and U+000C are line breaks to str.splitlines() but stay raw inside a JSON
    # string written with ensure_ascii=False; a reader that splits on them breaks documents
    texts = [f"Document {i} crosses the bridge\u2028and\x85the river\x0c{'é' * i}."
             for i in range(10)]
    rows = [json.dumps({"id": i, "body": text}, ensure_ascii=False) for i, text in
            enumerate(texts)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(rows[:5]) + "\n\n" + "\n".join(rows[5:]),
                                           encoding="utf-8")
    result = _prepare(run_cli, tiny_model, tmp_path / "corpus.jsonl", tmp_path / "j" / "prepared",
                      "--text-field", "body")
    assert result.code == 0, result.err
    read_back = [t for split in ("train", "val", "test")
                 for t in load_split(tmp_path / "j" / "prepared", split).texts]
    assert sorted(read_back) == sorted(texts)


def test_tokenize_documents_gives_the_bytes_of_the_plain_list_version(tiny_model):
    from safetensors.torch import save
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = [Document(title, entry["extract"]) for title, entry in make_corpus_texts().items()]
    ids, offsets = tokenize_documents(tokenizer, docs, batch_size=7)  # batches end mid-corpus
    # the reference: the previous implementation, one flat Python list of ints
    pieces = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    ref_ids = torch.tensor([t for p in pieces for t in p], dtype=torch.int32)
    ref_offsets = torch.cumsum(torch.tensor([0] + [len(p) for p in pieces], dtype=torch.int64),
                               dim=0)
    assert save({"input_ids": ids, "doc_offsets": offsets}) == \
        save({"input_ids": ref_ids, "doc_offsets": ref_offsets})
    empty_ids, empty_offsets = tokenize_documents(tokenizer, [])
    assert empty_ids.dtype == torch.int32 and empty_ids.shape == (0,)
    assert empty_offsets.tolist() == [0]


def test_eval_ppl_writes_metrics(run_cli, tiny_model, prepared_tiny, tmp_path):
    result = run_cli("eval-ppl", "--model", str(tiny_model), "--data", str(prepared_tiny),
                     "--context-length", "32", "--stride", "16", "--batch-size", "2",
                     "--metrics", str(tmp_path / "ppl.json"), "--max-tokens", "100")
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "ppl.json").read_text())
    assert metrics["context_length"] == 32 and metrics["stride"] == 16
    assert 100 <= metrics["tokens"] < 200  # whole documents up to the budget
    vocab = 400
    assert 1 < metrics["token_ppl"] < 3 * vocab  # a random model: near-uniform
    assert metrics["bits_per_byte"] > 0 and metrics["word_ppl"] > metrics["token_ppl"]


def test_params_yaml_gives_defaults_and_options_override(run_cli, tiny_model, prepared_tiny,
                                                         tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "base": {"model": str(tiny_model)},
        "eval_ppl": {"data": str(prepared_tiny), "context_length": 16, "stride": 8,
                     "max_tokens": 60, "metrics": "out.json"}}))
    assert run_cli("eval-ppl", cwd=tmp_path).code == 0
    assert json.loads((tmp_path / "out.json").read_text())["stride"] == 8
    assert run_cli("eval-ppl", "--stride", "4", cwd=tmp_path).code == 0
    assert json.loads((tmp_path / "out.json").read_text())["stride"] == 4


def test_console_script_prints_no_traceback(tmp_path, tiny_model):
    import subprocess
    import sys

    # a valid model, so the one thing wrong is the missing data folder
    result = subprocess.run([sys.executable, "-m", "newllm", "eval-ppl", "--model",
                             str(tiny_model), "--data", "missing"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: missing/val.safetensors does not "
                                                   "exist"), result.stderr
    assert not (tmp_path / "metrics").exists()


def test_help_lists_params_keys(run_cli):
    result = run_cli("eval-ppl", "--help")
    assert result.code == 0
    assert "eval_ppl.stride" in result.out and "--max-tokens" in result.out


def test_artifact_tensors_are_on_cpu_and_typed(prepared_tiny):
    split = load_split(prepared_tiny, "train")
    assert split.input_ids.dtype == torch.int32 and split.doc_offsets.dtype == torch.int64
    assert int(split.doc_offsets[-1]) == len(split.input_ids)
    assert Path(split.artifact.path).suffix == ".safetensors"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(run_cli, tiny_model, prepared_tiny, tmp_path):
    result = run_cli("eval-ppl", "--model", str(tiny_model), "--data", str(prepared_tiny),
                     "--device", "cuda", cwd=tmp_path)
    assert_one_line_error(result, "base.device is 'cuda'", "no CUDA device")
