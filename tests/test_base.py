"""Base-model loading: local folders, ids in the local HF cache, clear errors otherwise."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_one_line_error

from newllm.base import load_base, state_dict_hash
from newllm.errors import NewllmError


def _fake_hub_cache(root, repo_id, source):
    """The layout huggingface_hub uses for a downloaded model: refs/main -> snapshots/<sha>."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return root


def test_model_id_in_local_hf_cache_loads(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(_fake_hub_cache(tmp_path, "acme/tiny", tiny_model)))
    from_cache = load_base("acme/tiny", device="cpu")
    from_folder = load_base(str(tiny_model), device="cpu")
    assert from_cache.info.model_id == "acme/tiny"
    # same files, same identity: provenance follows the weights, not the path
    assert from_cache.info.weights_hash == from_folder.info.weights_hash
    assert from_cache.info.tokenizer_hash == from_folder.info.tokenizer_hash


def test_model_id_not_in_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(NewllmError, match=r"not a local model directory, a \.gguf file or a "
                                          r"model id in the local Hugging Face cache"):
        load_base("acme/not-downloaded", device="cpu")


def test_unknown_model_id_through_the_cli(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("eval-ppl", "--model", "acme/nothing", cwd=tmp_path)
    assert_one_line_error(result, "base.model 'acme/nothing'")


def test_loaded_base_is_frozen_and_identified(tiny_model, other_tiny_model):
    base = load_base(str(tiny_model), device="cpu")
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    other = load_base(str(other_tiny_model), device="cpu")
    assert base.info.weights_hash != other.info.weights_hash
    assert base.info.tokenizer_hash != other.info.tokenizer_hash
    assert (base.info.num_layers, base.info.hidden_size) == (2, 32)


def test_state_dict_hash_sees_any_weight_change(tiny_model):
    base = load_base(str(tiny_model), device="cpu")
    before = state_dict_hash(base.model)
    assert state_dict_hash(base.model) == before
    with torch.no_grad():
        next(base.model.parameters()).view(-1)[0] += 1e-6
    assert state_dict_hash(base.model) != before


def test_bfloat16_dtype_is_applied(tiny_model):
    base = load_base(str(tiny_model), dtype="bfloat16", device="cpu")
    assert next(base.model.parameters()).dtype == torch.bfloat16
