"""Hidden state -> token embedding on the real default model (SmolLM2-135M)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.real_model


def test_linear_converter_beats_the_identity_baseline(run_cli, real_assets, tmp_path):
    model = str(real_assets / "smollm2-135m")
    result = run_cli("extract-pairs", "--model", model, "--hidden-index", "-1",
                     "--max-tokens", "400", "--batch-size", "200", "--out-dir", "pairs",
                     "--metrics-dir", "m", cwd=tmp_path)
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "m" / "layer30.json").read_text())["pairs"] == 400
    result = run_cli("train-converter", "--model", model, "--pairs-dir", "pairs",
                     "--hidden-index", "30", "--model-type", "linear", "--epochs", "30",
                     "--batch-size", "32", "--val-fraction", "0.25", "--out-dir", "conv",
                     "--metrics-dir", "cm", "--plots-dir", "cp", cwd=tmp_path)
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "cm" / "layer30_linear.json").read_text())
    assert metrics["val_tokens"] == 100 and metrics["train_tokens"] == 300
    # Held-out tokens: the converter's output points closer to the token's embedding row
    # than the raw last hidden state does (which predicts the *next* token, logit-lens style).
    assert metrics["val_cosine"] > metrics["identity_cosine"] + 0.05, metrics
    assert metrics["val_mse"] < metrics["identity_mse"]
