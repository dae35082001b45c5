"""extract-pairs, train-converter, converter-report and demo-recursive on the tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from newllm.core.artifacts import load_artifact
from newllm.core.base import load_base
from newllm.core.tokens import left_pad
from newllm.virtual_tokens.converter import Converter, ConverterConfig, load_converter
from newllm.virtual_tokens.pairs import PAIRS_KIND, load_pairs
from newllm.virtual_tokens.recursive import embed_ids, pool_hidden

N_LAYERS = 2  # the tiny Llama


@pytest.fixture(scope="module")
def tiny_base(tiny_model):
    return load_base(str(tiny_model), device="cpu")


@torch.inference_mode()
def next_token_logits(model, rows, pad_id):
    """Next-token logits [B, V] after each row of input embeddings, as one left-padded batch
    (the padding generate_from_rows uses)."""
    embeds, mask, positions = left_pad(rows, embed_ids(model, [pad_id])[0])
    return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                 logits_to_keep=1).logits[:, -1].float()


def _extract(run_cli, model: Path, cwd: Path, *extra: str):
    cwd.mkdir(parents=True, exist_ok=True)
    return run_cli("extract-pairs", "--model", str(model), "--max-tokens", "200",
                   "--batch-size", "64", "--out-dir", "pairs", "--metrics-dir", "m", *extra,
                   cwd=cwd)


def _train(run_cli, model: Path, cwd: Path, *extra: str):
    return run_cli("train-converter", "--model", str(model), "--pairs-dir", "pairs",
                   "--epochs", "4", "--batch-size", "32", "--val-fraction", "0.25",
                   "--topk", "3", "--out-dir", "conv", "--metrics-dir", "cm", "--plots-dir",
                   "cp", *extra, cwd=cwd)


def _hf_hidden(base, ids: list[int], layer: int) -> torch.Tensor:
    """Independent reference: HF's own hidden_states of one sequence, at its last position."""
    with torch.no_grad():
        out = base.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0, -1]


def test_extract_pairs_shapes_and_metadata(run_cli, tiny_model, tiny_base, tmp_path):
    result = _extract(run_cli, tiny_model, tmp_path)
    assert result.code == 0, result.err
    path = tmp_path / "pairs" / f"layer{N_LAYERS}" / "pairs.safetensors"
    artifact = load_artifact(path, kind=PAIRS_KIND, base=tiny_base.info.as_dict())
    x, y, ids = artifact["X"], artifact["Y"], artifact["token_ids"]
    assert x.shape == y.shape == (200, 32) and ids.shape == (200,)
    assert x.dtype == y.dtype == torch.float32 and ids.dtype == torch.int64
    tokenizer = tiny_base.tokenizer
    special = sorted(tokenizer.all_special_ids)
    assert special == [0, 1, 2]  # the fixture's <|endoftext|>, <|bos|>, <|pad|>
    assert ids.tolist() == list(range(3, 203))  # the first 200 ordinary ids, specials skipped
    meta = artifact.meta
    assert meta["kind"] == PAIRS_KIND and meta["stage"] == "extract-pairs"
    assert meta["base"]["weights_hash"] == tiny_base.info.weights_hash
    assert meta["base"]["model_id"] == tiny_base.info.model_id
    # read after the document separator (the fixture's <|endoftext|>), not the BOS marker
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert meta["extra"]["layer_index"] == N_LAYERS
    assert meta["extra"]["prefix_token_id"] == separator != tokenizer.bos_token_id
    assert meta["extra"]["prefix_token"] == "<|endoftext|>"
    assert meta["extra"]["skipped_special_ids"] == special
    assert meta["params"]["extract_pairs"]["hidden_index"] == -1
    embedding = tiny_base.model.get_input_embeddings().weight
    assert torch.equal(y, embedding[ids].detach())
    for row in (0, 57, 199):
        expected = _hf_hidden(tiny_base, [separator, int(ids[row])], N_LAYERS)
        torch.testing.assert_close(x[row], expected, rtol=0, atol=1e-5)
    metrics = json.loads((tmp_path / "m" / f"layer{N_LAYERS}.json").read_text())
    assert metrics["pairs"] == 200 and metrics["skipped_special"] == 3
    assert metrics["layer_index"] == N_LAYERS and metrics["tokens_per_s"] > 0


def test_bos_on_and_off(run_cli, tiny_model, tiny_base, tmp_path):
    for bos in ("true", "false"):
        for layer in ("0", "1"):
            assert _extract(run_cli, tiny_model, tmp_path / bos, "--after-separator", bos,
                            "--hidden-index", layer).code == 0
    pairs = {(bos, layer): load_pairs(tmp_path / bos / "pairs" / f"layer{layer}" /
                                      "pairs.safetensors", tiny_base.info.as_dict())
             for bos in ("true", "false") for layer in (0, 1)}
    with_bos, without = pairs[("true", 1)], pairs[("false", 1)]
    assert with_bos.prefix_id == 0 and without.prefix_id is None
    assert torch.equal(with_bos.token_ids, without.token_ids)
    assert (with_bos.x - without.x).abs().max() > 1e-2  # the BOS context changes X
    token = int(without.token_ids[5])
    torch.testing.assert_close(without.x[5], _hf_hidden(tiny_base, [token], 1), rtol=0,
                               atol=1e-5)
    # hidden state 0 is the embedding output: X == Y whatever comes before the token
    for bos in ("true", "false"):
        assert torch.equal(pairs[(bos, 0)].x, pairs[(bos, 0)].y)


def test_same_params_give_byte_identical_pairs(run_cli, tiny_model, tmp_path):
    for run in ("a", "b"):
        assert _extract(run_cli, tiny_model, tmp_path / run).code == 0
    first, second = (tmp_path / run / "pairs" / "layer2" / "pairs.safetensors" for run in "ab")
    assert first.read_bytes() == second.read_bytes()


def test_same_params_give_byte_identical_converter_artifacts(run_cli, tiny_model, tmp_path):
    outputs = ("conv/layer2_mlp/converter.safetensors",
               "conv/layer2_mlp/converter.safetensors.json", "cm/layer2_mlp.json",
               "cp/layer2_mlp.csv")
    for run in ("a", "b"):
        assert _extract(run_cli, tiny_model, tmp_path / run).code == 0
        result = _train(run_cli, tiny_model, tmp_path / run, "--model-type", "mlp",
                        "--hidden-dim", "16")
        assert result.code == 0, result.err
    for name in outputs:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # and nothing else in the converter folder that could differ
    assert sorted(p.name for p in (tmp_path / "a" / "conv" / "layer2_mlp").iterdir()) == \
        ["converter.safetensors", "converter.safetensors.json"]


@pytest.mark.parametrize("layer", ["3", "-4"])
def test_extract_pairs_layer_out_of_range(run_cli, tiny_model, tmp_path, layer):
    result = _extract(run_cli, tiny_model, tmp_path, "--hidden-index", layer)
    assert_one_line_error(result, "extract_pairs.hidden_index", "[-3, 2]", layer)
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "m").exists()


def test_extract_pairs_max_tokens_zero(run_cli, tiny_model, tmp_path):
    result = _extract(run_cli, tiny_model, tmp_path, "--max-tokens", "0")
    assert_one_line_error(result, "--max-tokens", "extract_pairs.max_tokens must be an integer "
                          ">= 1")
    assert not (tmp_path / "pairs").exists()
    (tmp_path / "params.yaml").write_text("extract_pairs:\n  max_tokens: 0\n")
    result = run_cli("extract-pairs", "--model", str(tiny_model), cwd=tmp_path)
    assert_one_line_error(result, "params.yaml", "extract_pairs.max_tokens")


def test_train_converter_metrics_match_an_independent_computation(run_cli, tiny_model,
                                                                  tiny_base, tmp_path):
    assert _extract(run_cli, tiny_model, tmp_path, "--max-tokens", "null").code == 0
    result = _train(run_cli, tiny_model, tmp_path, "--model-type", "linear")
    assert result.code == 0, result.err
    pairs = load_pairs(tmp_path / "pairs" / "layer2" / "pairs.safetensors",
                       tiny_base.info.as_dict())
    n_ordinary = len(tiny_base.tokenizer) - 3
    assert len(pairs.token_ids) == n_ordinary
    converter, artifact = load_converter(tmp_path / "conv" / "layer2_linear" /
                                         "converter.safetensors", tiny_base.info.as_dict())
    assert artifact.meta["extra"]["layer_index"] == 2
    assert artifact.meta["extra"]["prefix_token_id"] == 0  # the tiny model's <|endoftext|>
    val_ids = artifact["val_token_ids"]
    assert len(val_ids) == round(n_ordinary * 0.25)
    rows = torch.isin(pairs.token_ids, val_ids)
    metrics = json.loads((tmp_path / "cm" / "layer2_linear.json").read_text())
    assert metrics["val_tokens"] == rows.sum() and metrics["train_tokens"] == (~rows).sum()

    embeddings = tiny_base.model.get_input_embeddings().weight.detach().numpy()
    # the pad row is all zeros: like F.normalize, keep it at zero similarity
    table = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    true_ids = pairs.token_ids[rows].numpy()

    def expected(vectors: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        sims = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ table.T
        ranks = (sims > sims[np.arange(len(sims)), true_ids][:, None]).sum(axis=1)
        cos = (vectors * targets).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(
            targets, axis=1)
        return {"mse": ((vectors - targets) ** 2).mean(), "cosine": cos.mean(),
                "top1": (ranks < 1).mean(), "top3": (ranks < 3).mean()}

    with torch.no_grad():
        predicted = converter(pairs.x[rows]).numpy()
    targets = pairs.y[rows].numpy()
    for prefix, vectors in (("val", predicted), ("identity", pairs.x[rows].numpy())):
        for stat, value in expected(vectors, targets).items():
            assert metrics[f"{prefix}_{stat}"] == pytest.approx(value, rel=1e-4, abs=1e-6), \
                (prefix, stat)
    with (tmp_path / "cp" / "layer2_linear.csv").open() as handle:
        losses = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in losses] == [1, 2, 3, 4]
    assert float(losses[-1]["val_loss"]) == pytest.approx(metrics["val_mse"], rel=1e-4)
    assert float(losses[-1]["train_loss"]) < float(losses[0]["train_loss"])


def test_train_converter_rejects_pairs_from_another_model(run_cli, tiny_model,
                                                          other_tiny_model, tmp_path):
    assert _extract(run_cli, other_tiny_model, tmp_path).code == 0
    result = _train(run_cli, tiny_model, tmp_path)
    assert_one_line_error(result, "pairs/layer2/pairs.safetensors", "was made with base model")
    assert not (tmp_path / "conv").exists() and not (tmp_path / "cm").exists()


def test_train_converter_missing_pairs_and_bad_layer(run_cli, tiny_model, tmp_path):
    assert_one_line_error(_train(run_cli, tiny_model, tmp_path), "pairs/layer2/pairs.safetensors",
                          "does not exist")
    assert_one_line_error(_train(run_cli, tiny_model, tmp_path, "--hidden-index", "5"),
                          "train_converter.hidden_index", "[-3, 2]")


def test_converter_report_collects_every_layer(run_cli, tiny_model, tmp_path):
    for layer in ("1", "2"):
        assert _extract(run_cli, tiny_model, tmp_path, "--hidden-index", layer).code == 0
        for model_type in ("linear", "mlp"):
            assert _train(run_cli, tiny_model, tmp_path, "--hidden-index", layer, "--model-type",
                          model_type, "--hidden-dim", "16").code == 0
    # a layer no longer declared (dropped from per_layer.layers) must not linger in the report
    stale = json.loads((tmp_path / "cm" / "layer2_linear.json").read_text())
    for model_type in ("linear", "mlp"):
        (tmp_path / "cm" / f"layer0_{model_type}.json").write_text(json.dumps(stale))
    # the declared layers (per_layer.layers) as a YAML list on the command line
    result = run_cli("converter-report", "--converters", "cm", "--layers", "[1, 2]",
                     "--model-types", "[linear, mlp]", "--metrics", "report.json",
                     "--plot", "by_layer.csv", cwd=tmp_path)
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert not any(key.startswith("layer0_") for key in report)
    assert len(report) == 2 * 3 * 4  # layers x (linear, mlp, identity) x stats
    for layer in (1, 2):
        for model_type in ("linear", "mlp"):
            source = json.loads((tmp_path / "cm" / f"layer{layer}_{model_type}.json").read_text())
            for stat in ("mse", "cosine", "top1", "top3"):
                assert report[f"layer{layer}_{model_type}_{stat}"] == source[f"val_{stat}"]
                assert report[f"layer{layer}_identity_{stat}"] == source[f"identity_{stat}"]
    with (tmp_path / "by_layer.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == ["1", "2"]
    assert float(rows[1]["mlp_top1"]) == pytest.approx(report["layer2_mlp_top1"], rel=1e-5)
    assert "identity_top1" in rows[0] and "layer" in result.out


def test_converter_report_reads_only_the_declared_model_types(run_cli, tmp_path):
    metrics = {"topk": 2, **{f"{prefix}_{stat}": value for prefix, value in
                             (("val", 0.5), ("identity", 0.25))
                             for stat in ("mse", "cosine", "top1", "top2")}}
    (tmp_path / "cm").mkdir()
    for name in ("layer3_linear", "layer3_mlp", "layer4_linear"):
        (tmp_path / "cm" / f"{name}.json").write_text(json.dumps(metrics))
    result = run_cli("converter-report", "--converters", "cm", "--layers", "[4, 3]",
                     "--model-types", "linear", "--metrics", "r.json", "--plot", "p.csv",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(report) == sorted(f"layer{layer}_{variant}_{stat}" for layer in (3, 4)
                                    for variant in ("linear", "identity")
                                    for stat in ("mse", "cosine", "top1", "top2"))
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == ["3", "4"] and "mlp_top1" not in rows[0]


def test_demo_recursive_prints_three_variants(run_cli, tiny_model, tmp_path):
    assert _extract(run_cli, tiny_model, tmp_path).code == 0
    assert _train(run_cli, tiny_model, tmp_path).code == 0
    result = run_cli("demo-recursive", "--model", str(tiny_model), "--converter",
                     "conv/layer2_linear/converter.safetensors", "--compress-text",
                     "The river flows through the old city.", "--prompt", "The bridge",
                     "--max-new-tokens", "4", "--pool", "last", cwd=tmp_path)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    for variant in ("[without vector]", "[with vector]", "[with full old text]"):
        assert sum(line.startswith(variant) for line in lines) == 1, result.out
    assert "nearest tokens to the vector" in result.out


def test_demo_recursive_bad_inputs(run_cli, tiny_model, other_tiny_model, tmp_path):
    assert _extract(run_cli, other_tiny_model, tmp_path).code == 0
    assert _train(run_cli, other_tiny_model, tmp_path).code == 0
    result = run_cli("demo-recursive", "--model", str(tiny_model), "--converter",
                     "conv/layer2_linear/converter.safetensors", cwd=tmp_path)
    assert_one_line_error(result, "converter.safetensors", "was made with base model")
    result = run_cli("demo-recursive", "--model", str(tiny_model), "--compress-text", "  ",
                     cwd=tmp_path)
    assert_one_line_error(result, "demo_recursive.compress_text")
    result = run_cli("demo-recursive", "--model", str(tiny_model), "--pool", "max",
                     cwd=tmp_path)
    assert result.code != 0 and "--pool" in result.err


def test_pool_hidden_leaves_bos_out(tiny_base):
    text = torch.tensor([40, 41, 42, 43])
    with torch.no_grad():
        states = tiny_base.model(input_ids=torch.cat([torch.tensor([1]), text])[None],
                                 output_hidden_states=True).hidden_states[1][0]
        mean = pool_hidden(tiny_base.model, text, 1, 1, "mean")
        last = pool_hidden(tiny_base.model, text, 1, 1, "last")
    torch.testing.assert_close(mean, states[1:].mean(dim=0), rtol=0, atol=1e-6)
    torch.testing.assert_close(last, states[-1], rtol=0, atol=1e-6)


def test_prepended_vector_reaches_the_logits(tiny_base):
    model, bos, pad = tiny_base.model, 1, 2
    prompt = [50, 51, 52]
    converter = Converter(ConverterConfig("linear", 32, 32))
    torch.manual_seed(0)
    torch.nn.init.normal_(converter.net.weight, std=0.3)
    with torch.no_grad():
        vector = converter(pool_hidden(model, torch.tensor([60, 61, 62]), 2, bos, "mean"))
        without = embed_ids(model, [bos, *prompt])
        with_vector = torch.cat([embed_ids(model, [bos]), vector[None],
                                 embed_ids(model, prompt)])
        logits = next_token_logits(model, [without, with_vector], pad)
        assert (logits[0] - logits[1]).abs().max() > 1e-3  # the vector changes the prediction
        # A vector equal to token t's embedding acts exactly as token t does.
        token = 77
        as_vector = torch.cat([embed_ids(model, [bos]), model.get_input_embeddings().weight[
            token][None], embed_ids(model, prompt)])
        reference = model(input_ids=torch.tensor([[bos, token, *prompt]])).logits[0, -1]
        torch.testing.assert_close(next_token_logits(model, [as_vector], pad)[0], reference,
                                   rtol=0, atol=1e-5)
        # Left padding (mask and positions) leaves each row's logits as they are alone.
        batched = next_token_logits(model, [without, with_vector, as_vector], pad)
        for row, alone in enumerate([without, with_vector, as_vector]):
            torch.testing.assert_close(batched[row], next_token_logits(model, [alone], pad)[0],
                                       rtol=0, atol=1e-5)
