"""The Chameleon stages end to end on the tiny model and a small MovieLens folder: outputs,
provenance, determinism, the frozen check, per-user directions, `newllm generate`; and on the
real default model, a few users."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chameleon_helpers import make_mini_movielens
from conftest import assert_one_line_error

from newllm.chameleon.export import read_control_vector
from newllm.core.artifacts import read_meta

DATA = ("--num-direction-users", "4", "--num-eval-users", "6", "--max-profile-items", "5",
        "--min-profile-items", "3")


def run_line(run_cli, model: Path, cwd: Path, *, scope: str = "global", users: str = "direction",
             layers: str = "[0, 1]", extra_eval: tuple[str, ...] = ()) -> dict[str, dict]:
    make_mini_movielens(cwd / "ml-mini")
    # relative, so two folders record the same params (and write the same bytes)
    common = ("--model", str(model), "--data", "ml-mini", *DATA)
    result = run_cli("self-generate", *common, "--users", users, "--max-new-tokens", "4",
                     "--out", "gen.safetensors", "--metrics", "sg.json", cwd=cwd)
    assert result.code == 0, result.err
    result = run_cli("estimate-directions", "--model", str(model), "--generations",
                     "gen.safetensors", "--target-decoder-layers", layers, "--direction-scope",
                     scope,
                     "--out", "dir.safetensors", "--metrics", "ed.json", cwd=cwd)
    assert result.code == 0, result.err
    result = run_cli("eval-chameleon", *common, "--directions", "dir.safetensors",
                     "--max-new-tokens", "3", "--bootstrap", "50", "--sweep-alphas", "1.2",
                     "--control-vector", "cv.gguf", "--predictions", "pred.json",
                     "--metrics", "ev.json", "--plot", "alpha.csv", *extra_eval, cwd=cwd)
    assert result.code == 0, result.err
    return {name: json.loads((cwd / f"{name}.json").read_text()) for name in ("sg", "ed", "ev")}


def test_the_line_runs_and_is_deterministic(run_cli, tiny_model, tmp_path):
    first = run_line(run_cli, tiny_model, tmp_path / "a")
    second = run_line(run_cli, tiny_model, tmp_path / "b")
    for name in ("gen.safetensors", "dir.safetensors", "cv.gguf", "pred.json", "alpha.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("sg", "ed", "ev"):  # every figure but the wall time
        assert {k: v for k, v in first[name].items() if k != "seconds"} == \
            {k: v for k, v in second[name].items() if k != "seconds"}
    sg, ed, ev = first["sg"], first["ed"], first["ev"]
    for metrics in (sg, ed, ev):  # frozen: nothing trainable, weights unchanged
        assert metrics["trainable_params"] == 0 and metrics["total_params"] > 0
        assert metrics["weights_unchanged"] is True
    assert sg["users"] == 4 and sg["generations"] == 8
    assert 0 <= sg["neutral_clean_share"] <= 1
    meta = read_meta(tmp_path / "a" / "dir.safetensors")
    assert meta["kind"] == "chameleon-directions" and meta["extra"]["direction_scope"] == "global"
    layer = meta["extra"]["layers"]["model.layers.1.mlp"]
    assert layer["center"] is False and layer["hidden_size"] == 32 and "sign" in layer
    assert {"sigma1_share_p", "sigma1_share_diff", "diff_cos_mean", "angle_deg"} <= \
        set(layer["quality"])
    assert meta["shapes"]["layer1.theta_p"] == [32]
    assert ev["eval_users"] == 6 and ev["layers"] == "0,1"
    for condition in ("no_profile", "personalized", "edit", "null"):
        for scoring in ("gen", "lik"):
            low, acc, high = (ev[f"{condition}_{scoring}_accuracy{s}"] for s in ("_lo", "", "_hi"))
            assert 0 <= low <= acc <= high <= 1
    assert ev["edit_ratio_realized"] == pytest.approx(0.025, rel=1e-3)
    assert ev["null_ratio_realized"] == pytest.approx(0.025, rel=1e-3)
    assert ev["check_projection_parallelism"] == pytest.approx(1.0, abs=1e-6)
    assert ev["check_alpha_linearity_error"] < 1e-9
    assert 0 < ev["majority_accuracy"] <= 1 and 0 < ev["profile_free_oracle_accuracy"] <= 1
    # the likelihood scoring always names a tag
    predictions = json.loads((tmp_path / "a" / "pred.json").read_text())
    tags = set(predictions["tags"])
    assert all(q["edit_lik"] in tags for q in predictions["questions"])
    # the sweep: alpha 0 (personalized), the sweep alpha and the run's own alpha
    rows = (tmp_path / "a" / "alpha.csv").read_text().splitlines()
    assert rows[0] == "alpha,beta,edit_accuracy,edit_ratio,null_accuracy,null_ratio"
    assert [float(r.split(",")[0]) for r in rows[1:]] == [0.0, 0.6, 1.2]
    meta, vectors = read_control_vector(tmp_path / "a" / "cv.gguf")
    assert meta["general.architecture"] == "controlvector" and set(vectors) == {1}


def test_per_user_directions(run_cli, tiny_model, tmp_path):
    metrics = run_line(run_cli, tiny_model, tmp_path, scope="per_user", users="all",
                       layers="[1]", extra_eval=("--scoring", "likelihood"))
    meta = read_meta(tmp_path / "dir.safetensors")
    assert meta["shapes"]["layer1.theta_p"] == [10, 32]  # direction and evaluation users
    assert metrics["ev"]["direction_scope"] == "per_user"
    assert metrics["ev"]["edit_ratio_realized"] == pytest.approx(0.025, rel=1e-3)


def test_eval_refuses_layers_the_directions_lack_and_per_user_without_eval_users(
        run_cli, tiny_model, tmp_path):
    run_line(run_cli, tiny_model, tmp_path, layers="[1]", extra_eval=("--scoring", "likelihood",
                                                                     "--sweep-alphas", "[]"))
    common = ("--model", str(tiny_model), "--data", str(tmp_path / "ml-mini"), *DATA,
              "--directions", "dir.safetensors", "--metrics", "x.json")
    result = run_cli("eval-chameleon", *common, "--layers", "0", cwd=tmp_path)
    assert_one_line_error(result, "eval_chameleon.layers", "layer 0 is not among the layers")
    assert not (tmp_path / "x.json").exists()
    result = run_cli("estimate-directions", "--model", str(tiny_model), "--generations",
                     "gen.safetensors", "--target-decoder-layers", "[1]", "--direction-scope",
                     "per_user",
                     "--out", "pu.safetensors", "--metrics", "pu.json", cwd=tmp_path)
    assert result.code == 0, result.err
    result = run_cli("eval-chameleon", *common[:-4], "--directions", "pu.safetensors",
                     "--metrics", "x.json", cwd=tmp_path)
    assert_one_line_error(result, "per-user directions but none for evaluation user",
                          "users: all")


def test_generate_command_prints_both(run_cli, tiny_model, tmp_path):
    run_line(run_cli, tiny_model, tmp_path, layers="[1]", extra_eval=("--scoring", "likelihood",
                                                                     "--sweep-alphas", "[]"))
    result = run_cli("generate", "--model", str(tiny_model), "--directions", "dir.safetensors",
                     "--prompt", "The river flows", "--max-new-tokens", "4", "--alpha", "2",
                     "--beta", "1", "--target-edit-ratio", "0.5", cwd=tmp_path)
    assert result.code == 0, result.err
    assert "[without edit]" in result.out and "[with edit]" in result.out
    assert "realized edit ratio 0.5000" in result.out


@pytest.mark.real_model
def test_real_default_model_a_few_users_end_to_end(run_cli, real_assets, tmp_path):
    model = real_assets / "smollm2-135m"
    data = ("--data", str(real_assets / "ml-100k"), "--num-direction-users", "3",
            "--num-eval-users", "4", "--max-profile-items", "4")
    result = run_cli("self-generate", "--model", str(model), *data, "--max-new-tokens", "8",
                     "--out", "gen.safetensors", "--metrics", "sg.json", cwd=tmp_path)
    assert result.code == 0, result.err
    result = run_cli("estimate-directions", "--model", str(model), "--out", "dir.safetensors",
                     "--generations", "gen.safetensors", "--metrics", "ed.json", cwd=tmp_path)
    assert result.code == 0, result.err
    result = run_cli("eval-chameleon", "--model", str(model), *data, "--directions",
                     "dir.safetensors", "--max-new-tokens", "10", "--bootstrap", "50",
                     "--sweep-alphas", "[]", "--control-vector", "cv.gguf", "--predictions",
                     "pred.json", "--metrics", "ev.json", "--plot", "alpha.csv", cwd=tmp_path)
    assert result.code == 0, result.err
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["trainable_params"] == 0 and ev["weights_unchanged"] is True
    assert 130_000_000 < ev["total_params"] < 140_000_000  # SmolLM2-135M
    assert ev["layers"] == "21,29" and ev["tags"] == 18
    assert ev["edit_ratio_realized"] == pytest.approx(0.025, rel=1e-3)
    # the real model names a tag at least sometimes when the prompt lists them
    assert max(ev[f"{c}_gen_valid_tag_rate"] for c in ("no_profile", "personalized", "edit",
                                                       "null")) > 0
    meta, vectors = read_control_vector(tmp_path / "cv.gguf")
    assert meta["controlvector.model_hint"] == "llama" and set(vectors) == {21, 29}
    assert all(v.shape == (576,) for v in vectors.values())
