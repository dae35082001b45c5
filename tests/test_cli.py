"""The CLI end to end on the tiny model: params precedence, prepare-data, eval-ppl, bad input."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_one_line_error

from newllm.cli import _register, cli
from newllm.data import load_split


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
    titles = {}
    for split in ("train", "val", "test"):
        a, b = first / f"{split}.safetensors", second / f"{split}.safetensors"
        assert a.read_bytes() == b.read_bytes()
        titles[split] = {json.loads(x)["title"] for x in (first / f"{split}.jsonl").open()}
        prepared = load_split(first, split)
        # document boundaries: each document's tokens decode back to its text
        assert len(prepared.doc_offsets) == len(prepared.texts) + 1
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


@pytest.mark.parametrize("params,needles", [
    ({"eval_ppl": {"strid": 8}}, ["eval_ppl.strid is not a known parameter"]),
    ({"eval_ppl": {"stride": "eight"}}, ["eval_ppl.stride must be an integer", "'eight'"]),
    ({"eval_ppl": {"stride": 0}}, ["eval_ppl.stride must be an integer >= 1"]),
    ({"eval_ppl": {"split": "dev"}}, ["eval_ppl.split must be one of"]),
    ({"base": {"dtype": 16}}, ["base.dtype must be one of"]),
])
def test_bad_params_yaml_is_one_clear_line(run_cli, tmp_path, params, needles):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("eval-ppl", cwd=tmp_path)
    assert_one_line_error(result, "params.yaml", *needles)
    assert not (tmp_path / "metrics").exists()


def test_inconsistent_params_name_both_keys(run_cli, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"eval_ppl": {"context_length": 8, "stride": 16}}))
    result = run_cli("eval-ppl", cwd=tmp_path)
    assert_one_line_error(result, "eval_ppl.stride (16)", "eval_ppl.context_length (8)")


def test_bad_option_value_is_rejected(run_cli, tmp_path):
    result = run_cli("eval-ppl", "--stride", "0", cwd=tmp_path)
    assert_one_line_error(result, "--stride", "eval_ppl.stride")


def test_unknown_model_path(run_cli, tmp_path, mini_corpus):
    result = run_cli("prepare-data", "--model", str(tmp_path / "no-such-model"),
                     "--corpus", str(mini_corpus), "--out", "prepared", cwd=tmp_path)
    assert_one_line_error(result, "base.model", "no-such-model")
    assert not (tmp_path / "prepared").exists()


def test_folder_that_is_not_a_model(run_cli, tmp_path, mini_corpus):
    (tmp_path / "empty-model").mkdir()
    result = run_cli("prepare-data", "--model", "empty-model", "--corpus", str(mini_corpus),
                     cwd=tmp_path)
    assert_one_line_error(result, "empty-model", "config.json")


def test_empty_corpus(run_cli, tmp_path, tiny_model):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("\n\n  \n")
    result = run_cli("prepare-data", "--model", str(tiny_model), "--corpus", "corpus",
                     "--out", "prepared", cwd=tmp_path)
    assert_one_line_error(result, "corpus", "contains no documents")
    assert not (tmp_path / "prepared").exists()


def test_missing_prepared_data(run_cli, tmp_path, tiny_model):
    result = run_cli("eval-ppl", "--model", str(tiny_model), "--data", "nothing-here",
                     cwd=tmp_path)
    assert_one_line_error(result, "nothing-here", "does not exist")


def test_prepared_data_from_another_tokenizer_is_rejected(run_cli, tmp_path, other_tiny_model,
                                                          prepared_tiny):
    result = run_cli("eval-ppl", "--model", str(other_tiny_model), "--data",
                     str(prepared_tiny), cwd=tmp_path)
    assert_one_line_error(result, "was made with base model", "tokenizer")


def test_console_script_prints_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "newllm", "eval-ppl", "--data", "missing"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")


def test_every_stage_option_has_a_params_key_and_dvc_passes_it():
    _register()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        command = cli.commands[name.split("@")[0]]
        # each option's help names its params key: "[params: group.key; ...]"
        option_groups = {o.name.replace("_", "-"): re.search(r"\[params: ([a-z_]+)\.", o.help)[1]
                         for o in command.params if o.name != "help"}
        passed = re.findall(r"--([a-z-]+) \$\{([a-z_]+)\.([a-z_]+)\}", stage["cmd"])
        # a whole group, `${per_layer}`, is how DVC passes a list: `--layers 1 15 30`
        words = stage["cmd"].split()
        groups = [m[1] for before, word in itertools.pairwise(words)
                  if (m := re.fullmatch(r"\$\{([a-z_]+)\}", word))
                  and not before.startswith("--")]
        passed += [(key.replace("_", "-"), group, key) for group in groups
                   for key in params[group]]
        assert {flag for flag, _, _ in passed} == set(option_groups), name
        assert len(passed) == len(re.findall(r"--", stage["cmd"])) + sum(
            len(params[group]) for group in groups), name
        for flag, group, key in passed:
            assert flag == key.replace("_", "-"), (name, flag, key)
            if group == "item":
                # a matrix/foreach value: it must be one of the stage's iteration keys, and
                # the option still has a params.yaml entry (the default of a run by hand)
                assert key in (stage.get("matrix") or {}) or "foreach" in stage, (name, key)
                group = option_groups[flag]
            assert key in params[group], (name, group, key)


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
