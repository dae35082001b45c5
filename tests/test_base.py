"""Base-model loading: local folders, ids in the local HF cache, clear errors otherwise."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_one_line_error

from newllm.core.base import load_base, state_dict_hash
from newllm.core.errors import NewllmError


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


def _copy_model(source, target):
    shutil.copytree(source, target)
    return target


def test_weights_hash_is_cached_until_a_file_changes(tiny_model, tmp_path, monkeypatch):
    import os

    import newllm.core.base as base_module

    monkeypatch.setenv("NEWLLM_CACHE_DIR", str(tmp_path / "cache"))
    model = _copy_model(tiny_model, tmp_path / "model")
    calls = []
    real_hash_files = base_module.hash_files
    monkeypatch.setattr(base_module, "hash_files",
                        lambda paths: calls.append(paths) or real_hash_files(paths))
    first = load_base(str(model), device="cpu").info.weights_hash
    assert len(calls) == 1 and (tmp_path / "cache" / "weights_hashes.json").exists()
    assert load_base(str(model), device="cpu").info.weights_hash == first
    assert len(calls) == 1  # the second load read no weight file

    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    assert load_base(str(model), device="cpu").info.weights_hash == first
    assert len(calls) == 2

    # new content with the old size and mtime (as `cp -p` would leave it) is re-hashed too
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(mtime, mtime))
    changed = base_module.cached_hash_files([weights])
    assert len(calls) == 3 and changed != first
    assert changed == real_hash_files([weights])


def test_weights_hash_cache_location(tmp_path, monkeypatch):
    from newllm.core.base import cache_dir

    monkeypatch.delenv("NEWLLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "newllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "newllm"
    monkeypatch.setenv("NEWLLM_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_damaged_or_unwritable_cache_only_costs_a_rehash(tiny_model, tmp_path, monkeypatch):
    from newllm.core.base import cached_hash_files, hash_files

    weights = [tiny_model / "model.safetensors"]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "weights_hashes.json").write_text("{not json")
    monkeypatch.setenv("NEWLLM_CACHE_DIR", str(cache))
    assert cached_hash_files(weights) == hash_files(weights)
    monkeypatch.setenv("NEWLLM_CACHE_DIR", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")  # the cache "folder" cannot be made
    assert cached_hash_files(weights) == hash_files(weights)


def test_model_path_with_tilde_is_expanded(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _copy_model(tiny_model, tmp_path / "models" / "x")
    base = load_base("~/models/x", device="cpu")
    assert base.info.weights_hash == load_base(str(tiny_model), device="cpu").info.weights_hash


def test_importing_newllm_sets_no_environment():
    import os
    import subprocess
    import sys

    code = ("import os, sys; before = dict(os.environ); "
            "import newllm.core.base, newllm.foundation.assets, newllm.core.artifacts, "
            "newllm.core.cli; "
            "print(dict(os.environ) == before, 'transformers' in sys.modules)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=True)
    assert result.stdout.split() == ["True", "False"]


def test_loading_makes_the_hub_offline_even_if_imported_first(tiny_model, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    load_base(str(tiny_model), device="cpu")
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True


def test_state_dict_hash_takes_scalar_buffers():
    module = torch.nn.Linear(2, 2)
    module.register_buffer("scale", torch.tensor(1.5))
    before = state_dict_hash(module)
    module.scale += 1
    assert state_dict_hash(module) != before


def test_a_generic_fast_tokenizer_loads_directly_and_equals_autotokenizer(tiny_model, tmp_path):
    import json

    from transformers import AutoTokenizer

    from newllm.core.base import _generic_fast_tokenizer, _resolve, load_tokenizer, tokenizer_hash

    assert _generic_fast_tokenizer(_resolve(str(tiny_model)))
    direct, info = load_tokenizer(str(tiny_model))
    auto = AutoTokenizer.from_pretrained(tiny_model)
    assert info.tokenizer_hash == tokenizer_hash(auto)
    text = "The river flows through the old city."
    assert direct(text)["input_ids"] == auto(text)["input_ids"]
    assert direct.eos_token == auto.eos_token and direct.pad_token == auto.pad_token
    # a model-specific tokenizer class goes through AutoTokenizer, as before
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizer"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert not _generic_fast_tokenizer(_resolve(str(other)))
