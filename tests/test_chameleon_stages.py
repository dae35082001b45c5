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
                     "--max-leak", "1", "--out", "gen.safetensors", "--metrics", "sg.json",
                     cwd=cwd)
    assert result.code == 0, result.err
    result = run_cli("estimate-directions", "--model", str(model), "--generations",
                     "gen.safetensors", "--target-decoder-layers", layers, "--direction-scope",
                     scope,
                     "--out", "dir.safetensors", "--metrics", "ed.json", cwd=cwd)
    assert result.code == 0, result.err
    result = run_cli("eval-chameleon", *common, "--directions", "dir.safetensors",
                     "--max-new-tokens", "3", "--bootstrap", "50", "--sweep-alphas", "1.2",
                     "--null-draws", "4", "--null-users", "4", "--gen-users", "2",
                     "--control-vector", "cv.gguf", "--predictions", "pred.json",
                     "--metrics", "ev.json", "--plot", "alpha.csv", *extra_eval, cwd=cwd)
    assert result.code == 0, result.err
    return {name: json.loads((cwd / f"{name}.json").read_text()) for name in ("sg", "ed", "ev")}


def test_the_line_runs_and_is_deterministic(run_cli, tiny_model, tmp_path):
    first = run_line(run_cli, tiny_model, tmp_path / "a")
    second = run_line(run_cli, tiny_model, tmp_path / "b")
    for name in ("gen.safetensors", "dir.safetensors", "cv.gguf", "pred.json", "alpha.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("sg", "ed", "ev"):  # every figure but the wall times
        assert {k: v for k, v in first[name].items() if not k.startswith("seconds")} == \
            {k: v for k, v in second[name].items() if not k.startswith("seconds")}
    sg, ed, ev = first["sg"], first["ed"], first["ev"]
    for metrics in (sg, ed, ev):  # frozen: nothing trainable, weights unchanged
        assert metrics["trainable_params"] == 0 and metrics["total_params"] > 0
        assert metrics["weights_unchanged"] is True
    assert sg["users"] == 4 and sg["generations"] == 8
    assert sg["neutral_leak_texts"] >= 1 and -1 <= sg["neutral_leak_within_genre"] <= 1
    gen_meta = read_meta(tmp_path / "a" / "gen.safetensors")
    profile_of = gen_meta["extra"]["mismatched_profile_of"]
    direction = gen_meta["extra"]["direction_users"]
    assert sorted(profile_of) == sorted(direction)
    assert all(a != b for a, b in zip(direction, profile_of, strict=True))  # a derangement
    meta = read_meta(tmp_path / "a" / "dir.safetensors")
    assert meta["kind"] == "chameleon-directions" and meta["extra"]["direction_scope"] == "global"
    layer = meta["extra"]["layers"]["model.layers.1.mlp"]
    assert layer["center"] is False and layer["hidden_size"] == 32 and "sign" in layer
    assert {"sigma1_share_p", "sigma1_share_diff", "diff_cos_mean", "angle_deg"} <= \
        set(layer["quality"])
    assert meta["shapes"]["layer1.theta_p"] == [32]
    assert meta["extra"]["mismatched"] is True
    assert meta["shapes"]["mismatched.layer1.theta_p"] == [32]
    assert ev["eval_users"] == 6 and ev["layers"] == "0,1"
    for condition in ("no_profile", "personalized", "edit", "mismatched"):
        for view in ("listed", "calibrated", "all"):
            if condition == "no_profile" and view == "calibrated":
                assert "no_profile_calibrated_accuracy" not in ev
                continue
            low, acc, high = (ev[f"{condition}_{view}_accuracy{s}"] for s in ("_lo", "", "_hi"))
            assert 0 <= low <= acc <= high <= 1
    for condition in ("no_profile", "personalized", "edit", "null"):
        assert 0 <= ev[f"{condition}_gen_accuracy"] <= 1
    assert ev["gen_users"] == 2 and ev["null_users"] == 4 and ev["null_draws"] == 4
    for view in ("listed", "calibrated", "all"):
        assert ev[f"edit_null_p_{view}"] == ev[f"edit_null_rank_{view}"] / 5
        assert ev[f"null_{view}_accuracy_min"] <= ev[f"null_{view}_accuracy_mean"] \
            <= ev[f"null_{view}_accuracy_max"]
    assert ev["checks_passed"] is True and ev["check_restored_bit_identical"] is True
    assert ev["check_theta_p_gain"] == pytest.approx(0.6, rel=1e-4)
    assert ev["profile_rule_accuracy"] == 1.0  # the ceiling, by the gold rule
    assert ev["random_listed_accuracy"] == pytest.approx(1 / ev["candidates_mean"], rel=0.5)
    assert 0 < ev["majority_accuracy"] <= 1 and 0 < ev["profile_free_oracle_accuracy"] <= 1
    # every view's answer is a tag; the listed and calibrated ones are among the candidates
    predictions = json.loads((tmp_path / "a" / "pred.json").read_text())
    tags = set(predictions["tags"])
    for q in predictions["questions"]:
        assert q["edit_all"] in tags and q["edit_listed"] in q["candidates"]
        assert q["mismatched_calibrated"] in q["candidates"]
    assert sum(q["null_subset"] for q in predictions["questions"]) == 4
    assert len(predictions["null_draws"]["listed"]["accuracy"]) == 4
    # the sweep: alpha 0 (personalized), the run's own alpha and the sweep alpha
    rows = (tmp_path / "a" / "alpha.csv").read_text().splitlines()
    assert rows[0] == "alpha,beta,edit_accuracy,null_accuracy"
    assert [float(r.split(",")[0]) for r in rows[1:]] == [0.0, 0.6, 1.2]
    meta, vectors = read_control_vector(tmp_path / "a" / "cv.gguf")
    assert meta["general.architecture"] == "controlvector" and set(vectors) == {1}


def test_per_user_directions(run_cli, tiny_model, tmp_path):
    metrics = run_line(run_cli, tiny_model, tmp_path, scope="per_user", users="all",
                       layers="[1]", extra_eval=("--gen-users", "0"))
    meta = read_meta(tmp_path / "dir.safetensors")
    assert meta["shapes"]["layer1.theta_p"] == [10, 32]  # direction and evaluation users
    assert metrics["ev"]["direction_scope"] == "per_user"
    assert metrics["ev"]["edit_ratio_realized"] == pytest.approx(0.025, rel=1e-3)
    assert metrics["ev"]["checks_passed"] is True
    assert "mismatched_listed_accuracy" not in metrics["ev"]  # a global-scope null only


def test_eval_refuses_layers_the_directions_lack_and_per_user_without_eval_users(
        run_cli, tiny_model, tmp_path):
    run_line(run_cli, tiny_model, tmp_path, layers="[1]", extra_eval=("--gen-users", "0",
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
    run_line(run_cli, tiny_model, tmp_path, layers="[1]", extra_eval=("--gen-users", "0",
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
                     "--max-leak", "1", "--out", "gen.safetensors", "--metrics", "sg.json",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    result = run_cli("estimate-directions", "--model", str(model), "--out", "dir.safetensors",
                     "--generations", "gen.safetensors", "--metrics", "ed.json", cwd=tmp_path)
    assert result.code == 0, result.err
    result = run_cli("eval-chameleon", "--model", str(model), *data, "--directions",
                     "dir.safetensors", "--max-new-tokens", "10", "--bootstrap", "50",
                     "--sweep-alphas", "[]", "--null-draws", "2", "--gen-users", "2",
                     "--control-vector", "cv.gguf", "--predictions", "pred.json",
                     "--metrics", "ev.json", "--plot", "alpha.csv", cwd=tmp_path)
    assert result.code == 0, result.err
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["trainable_params"] == 0 and ev["weights_unchanged"] is True
    assert 130_000_000 < ev["total_params"] < 140_000_000  # SmolLM2-135M
    assert ev["layers"] == "21,29" and ev["tags"] == 18
    assert ev["edit_ratio_realized"] == pytest.approx(0.025, rel=1e-3)
    # the edit's checks on the real base (layers 21 and 29 of 30)
    assert ev["checks_passed"] is True and ev["check_lower_layers_bit_identical"] is True
    assert ev["check_resumed_pass_max_abs_diff"] <= 1e-4
    assert ev["profile_rule_accuracy"] == 1.0 and ev["candidates_mean"] >= 2
    # the real model names a tag at least sometimes when the prompt lists them
    assert max(ev[f"{c}_gen_valid_tag_rate"] for c in ("no_profile", "personalized", "edit",
                                                       "null")) > 0
    meta, vectors = read_control_vector(tmp_path / "cv.gguf")
    assert meta["controlvector.model_hint"] == "llama" and set(vectors) == {21, 29}
    assert all(v.shape == (576,) for v in vectors.values())
