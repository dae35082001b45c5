"""The real dvc.yaml on the tiny model: `dvc repro`, `dvc push` to a local remote, then a
fresh `git clone` + `dvc pull` is up to date (nothing reruns) and `newllm report` works there.

Runs the stages `newllm report` reads (and whatever they depend on, prepare-data included);
base.model and prepare_data.corpus point at the tiny model and mini corpus outside the repo
(DVC hashes such deps like any other), so fetch-assets never runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chameleon_helpers import make_mini_movielens
from conftest import REPO
from test_report import PNG_MAGIC, assert_printed, row_key

from newllm.core.headlines import headlines
from newllm.core.report import load_pipeline, metrics_files, producing_stage

HEADLINES = headlines()  # every line's, in report order

pytestmark = pytest.mark.skipif(shutil.which("git") is None,
                                reason="git is not installed; the DVC round trip needs a git repo")

BIN = Path(sys.executable).parent  # the venv's bin: `newllm` for the stages' commands


def run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(cwd.parent / "dvc-site-cache"),
           "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args)


def tiny_params(tiny_model: Path, mini_corpus: Path) -> dict:
    """The project's params.yaml, scaled down to the tiny model (2 layers) and mini corpus."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"].update(model=str(tiny_model), device="cpu", dtype="float32")
    params["prepare_data"].update(corpus=str(mini_corpus), val_fraction=0.2, test_fraction=0.1)
    params["eval_ppl"].update(context_length=32, stride=16, batch_size=8)
    params["per_layer"]["layers"] = [1, 2]
    params["extract_pairs"].update(max_tokens=64, batch_size=64)
    params["train_converter"].update(epochs=2, hidden_dim=16, batch_size=32)
    # two kinds and one ablation keep the Infini line's part of the tiny DAG short
    # (a second pythia seed: the report's over-seeds figures need a configuration with two)
    params["infini_runs"] = {"pythia": {"kind": "pythia"},
                             "pythia_seed-1": {"kind": "pythia", "seed": 1},
                             "infini": {"kind": "infini"},
                             "infini_delta-false_alibi-true": {
                                 "kind": "infini", "use_delta_rule": False, "use_alibi": True}}
    params["train_lm"].update(d_model=16, n_layers=2, n_heads=2, d_ff=32, shortlist=128,
                              segment_length=32, segments_per_sequence=8,  # passkey d 0..6
                              max_train_tokens=4096, val_max_tokens=200, batch_size=4,
                              reversal_repeats=2)
    params["eval_reversal"].update(max_pairs=8, distractors=2)
    params["train_infini_adapter"].update(segment_length=16, segments_per_sequence=2,
                                          max_train_tokens=1200, val_max_tokens=100, d_ff=32,
                                          reversal_repeats=1)
    params["eval_memory"].update(max_compressions=4, targets=2, passkey_fillers=[0, 1, 2, 4, 6, 12],
                                 passkey_trials=2)
    params["phase1_context"].update(context_dim=8, tokens_per_block=200, val_tokens=50,
                                    batch_size=64, max_iterations=2, lipschitz_samples=4)
    params["phase2_prep_cache"].update(train_tokens=400, chunk_tokens=128)
    params["phase2_token"].update(max_train_tokens=400, max_val_tokens=100, epochs=1,
                                  batch_size=32)
    params["cvfp_grid_runs"]["configs"] = ["blocks2_500", "inherit"]
    params["cvfp_grid"].update(phase1_tokens=200, max_iterations=1, train_tokens=300,
                               val_tokens=100)
    params["build_e_star"].update(num_samples=4, e_star_samples=2, val_samples=2, text_tokens=8,
                                  follow_tokens=4, steps=2, teacher_topk=8)
    params["train_compressor"].update(epochs=1, num_heads=4, hyper_ffn_dim=16, batch_size=4)
    params["eval_compressor"].update(greedy_tokens=2)
    params["reconstruct_capacity"].update(num_virtual_list=[1], lengths=[8, 16, 32],
                                          max_steps=2)  # the headline's lengths
    # Chameleon: a small MovieLens folder beside the tiny model, a few users, short outputs
    movielens = make_mini_movielens(Path(tiny_model).parent / "ml-mini")
    params["chameleon_data"].update(data=str(movielens), num_direction_users=3,
                                    num_eval_users=4, max_profile_items=4, min_profile_items=3)
    params["self_generate"].update(max_new_tokens=3)
    params["estimate_directions"]["target_decoder_layers"] = [0, 1]
    params["eval_chameleon"].update(max_new_tokens=2, bootstrap=20, sweep_alphas=[1.2])
    return params


def test_dvc_remote_round_trip(tmp_path, tiny_model, mini_corpus, run_cli):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    # The stages depend on the package's source files: the copy must have them.
    shutil.copytree(REPO / "newllm", project / "newllm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (project / "params.yaml").write_text(
        yaml.safe_dump(tiny_params(tiny_model, mini_corpus), sort_keys=False))
    run(project, "git", "init", "-q")
    run(project, "git", "config", "user.name", "newllm test")
    run(project, "git", "config", "user.email", "test@newllm.invalid")
    dvc(project, "init", "-q")

    pipeline = load_pipeline(project)
    targets = sorted({h.stage for h in HEADLINES}
                     | {producing_stage(pipeline, f) for p in pipeline.plots for f in p.y} - {""})
    dvc(project, "repro", *targets)
    assert not (project / "data" / "assets").exists()  # fetch-assets did not run
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", "tiny pipeline")

    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "local", str(remote))
    dvc(project, "push")
    assert any(p.is_file() for p in remote.rglob("*"))
    run(project, "git", "commit", "-q", "-m", "remote", "--", ".dvc/config")

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "prepared").exists()  # DVC-tracked: not in git
    dvc(clone, "pull", *targets, "--with-deps")
    assert (clone / "data" / "prepared").is_dir()
    status = dvc(clone, "status", *targets, "--with-deps")
    assert "up to date" in status, status
    again = dvc(clone, "repro", *targets)
    assert "Running stage" not in again, again

    # The report on the clone: every headline figure of the pulled metrics, one PNG per plot.
    result = run_cli("report", "--json", cwd=clone)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    for headline in HEADLINES:
        metrics = {k: v for path in metrics_files(pipeline, headline)
                   for k, v in json.loads((clone / path).read_text()).items()}
        figures = report[headline.name]["figures"]
        if headline.rows is None:
            assert figures and all(metrics[k] == v for k, v in figures.items())
        else:
            assert all(metrics[row_key(headline.rows, row) + k] == v
                       for row, values in figures.items() for k, v in values.items())
    assert set(report["converter"]["figures"]) == {"1", "2"}  # per_layer.layers
    assert set(report["cvfp_grid"]["figures"]) == {"blocks2_500", "inherit"}  # one per run
    result = run_cli("report", cwd=clone)
    assert result.code == 0, result.err
    assert_printed(result.out, {h.name: ({"": report[h.name]["figures"]} if h.rows is None
                                         else report[h.name]["figures"]) for h in HEADLINES})
    pngs = sorted((clone / "report").glob("*.png"))
    assert len(pngs) == len(pipeline.plots)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)
