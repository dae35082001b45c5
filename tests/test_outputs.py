"""Outputs never destroy a user's files (issue 18), as one table: every output option of every
stage, found from the registry (`newllm.core.cli.COMMANDS` and the params dataclasses'
`output=` metadata, so a new stage cannot be left out), pointed at what newllm did not write.

Each row exits 2 with one `error:` line naming the path, and the folder it runs in is byte for
byte what it was: the guard runs before any model loads, so the table is fast. Then: what
newllm wrote is replaced, a killed run's temporaries are removed by the rerun, the benches
take the stages' checks, and the wording fixes of the issue's point 6.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error

from newllm.core.cli import COMMANDS, OWN_COMMANDS, _register, cli
from newllm.core.outputs import check_output, clean_stale_temporaries

FILE_KINDS = ("metrics", "plot", "artifact", "gguf")
FOREIGN = {"metrics": "# my notes\n", "plot": "# my table\n", "artifact": "not tensors",
           "gguf": "not gguf"}


def outputs_of_every_stage() -> list[tuple[str, str, str]]:
    """(command, option, kind) of every output parameter of every stage."""
    _register()
    found = []
    for name in sorted(set(COMMANDS) - set(OWN_COMMANDS)):
        command = cli.commands[name]
        for cls in command.param_classes:
            for f in dataclasses.fields(cls):
                if "output" in f.metadata:
                    found.append((name, "--" + f.name.replace("_", "-"), f.metadata["output"]))
    return found


OUTPUTS = outputs_of_every_stage()


def checksum(folder: Path) -> str:
    """One digest of every path, kind and byte under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(b"d" if path.is_dir() else b"f" + path.read_bytes())
    return digest.hexdigest()


def setup_case(cwd: Path, case: str, kind: str) -> str:
    """Make the bad output of `case` in `cwd`; the option's value."""
    if case == "dot":
        (cwd / "mine.txt").write_text("mine\n")
        return "."
    if case == "file-where-a-folder-goes":
        (cwd / "x").write_text("mine\n")
        return "x" if kind not in FILE_KINDS else "x/out"
    if kind in FILE_KINDS:
        if case == "foreign-file":  # a user's file where newllm's would go (--metrics README.md)
            (cwd / "README.md").write_text(FOREIGN[kind])
            return "README.md"
        (cwd / "x").mkdir()  # a folder where a file goes, holding the user's file
        (cwd / "x" / "mine.txt").write_text("mine\n")
        return "x"
    (cwd / "x" / "sub").mkdir(parents=True)
    if case == "foreign-file":  # a folder holding a foreign file (and a subfolder)
        (cwd / "x" / "mine.txt").write_text("mine\n")
    else:  # a user's file named like newllm's, one folder down
        (cwd / "x" / "sub" / "notes.json").write_text('{"b": 1, "a": 2}')
    return "x"


CASES = ("foreign-file", "file-where-a-folder-goes", "folder-where-a-file-goes", "dot")


def test_the_table_covers_every_stage_output():
    stages = {name for name, _, _ in OUTPUTS}
    assert len(stages) >= 22 and len(OUTPUTS) >= 45
    assert {"prepare-data", "phase2-prep-cache", "train-lm", "eval-reversal", "build-e-star",
            "train-compressor", "fetch-assets", "eval-chameleon"} <= stages
    # a stage whose params have a path-like output key that is not marked would be missed
    inputs = {("infini-report", "metrics_dir"), ("cvfp-grid-summary", "metrics_dir")}  # read
    _register()
    for name in set(COMMANDS) - set(OWN_COMMANDS):
        for cls in cli.commands[name].param_classes:
            for f in dataclasses.fields(cls):
                if f.name in ("out", "out_dir", "metrics", "metrics_dir", "plot", "plots",
                              "plots_dir") and (name, f.name) not in inputs:
                    assert "output" in f.metadata, f"{name}: {f.name} is not marked output="


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command,option,kind", OUTPUTS,
                         ids=[f"{c}{o}" for c, o, _ in OUTPUTS])
def test_an_output_that_is_not_newllms_is_refused_and_nothing_changes(
        command, option, kind, case, run_cli, tmp_path):
    value = setup_case(tmp_path, case, kind)
    reads_runs = getattr(cli.commands[command], "reads_runs", ())
    if reads_runs:  # a report stage needs its run groups before its outputs are looked at
        (tmp_path / "params.yaml").write_text("".join(f"{g}:\n  one: {{}}\n"
                                                      for g in reads_runs))
    before = checksum(tmp_path)
    # the other outputs on fresh paths, so only this one is wrong
    others = [arg for o, k in {(o, k) for c, o, k in OUTPUTS if c == command and o != option}
              for arg in (o, f"elsewhere/{o.strip('-')}" + (".json" if k == "metrics" else ""))]
    result = run_cli(command, option, value, *others, "--model", "no-such-model-is-loaded",
                     cwd=tmp_path) if _takes_model(command) else run_cli(
        command, option, value, *others, cwd=tmp_path)
    assert result.code == 2, (result.code, result.err)
    assert_one_line_error(result, f"{option} {value}")
    assert checksum(tmp_path) == before


def _takes_model(command: str) -> bool:
    return any(p.name == "model" for p in cli.commands[command].params)


def test_a_folder_above_the_project_is_refused(run_cli, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    before = checksum(tmp_path)
    assert_one_line_error(run_cli("prepare-data", "--out", "..", cwd=project),
                          "--out ..", "the working folder or a folder above it")
    assert_one_line_error(run_cli("eval-ppl", "--metrics", str(tmp_path), cwd=project),
                          "folder above it")
    assert checksum(tmp_path) == before


def test_two_outputs_at_one_path_are_refused(run_cli, tmp_path):
    assert_one_line_error(run_cli("train-lm", "--metrics", "m.json", "--plot", "m.json",
                                  cwd=tmp_path), "--plot m.json", "same path")


# --- what newllm wrote is replaced ----------------------------------------------------------

def test_what_newllm_wrote_passes_the_guard(tmp_path):
    from newllm.core.artifacts import save_artifact, write_csv, write_metrics

    write_metrics(tmp_path / "m.json", {"a": 1})
    write_csv(tmp_path / "p.csv", ["epoch", "val_loss"], [[1, 0.5]])
    save_artifact(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, kind="k", stage="s",
                  params={})
    folder = tmp_path / "art"
    folder.mkdir()
    save_artifact(folder / "train.safetensors", {"x": torch.zeros(2)}, kind="k", stage="s",
                  params={})
    (folder / "train.jsonl").write_text("{}\n")
    (tmp_path / "runs" / "one").mkdir(parents=True)
    save_artifact(tmp_path / "runs" / "one" / "c.safetensors", {"x": torch.zeros(1)},
                  kind="k", stage="s", params={})
    (tmp_path / "runs" / ".gitignore").write_text("/one\n")
    check_output(tmp_path / "m.json", "metrics", "--metrics")
    check_output(tmp_path / "p.csv", "plot", "--plot")
    check_output(tmp_path / "a.safetensors", "artifact", "--out")
    check_output(folder, "dir", "--out")
    check_output(tmp_path / "runs", "container", "--out-dir")
    check_output(tmp_path / "new" / "deeper" / "m.json", "metrics", "--metrics")


def test_prepare_data_replaces_its_own_folder_and_keeps_a_users_old_name(
        run_cli, tmp_path, tiny_model, mini_corpus):
    args = ("prepare-data", "--model", str(tiny_model), "--corpus", str(mini_corpus),
            "--out", "prep", "--metrics", "m.json")
    assert run_cli(*args, cwd=tmp_path).code == 0
    first = checksum(tmp_path / "prep")
    # a user's file where the old dance once put the replaced folder is never touched
    mine = tmp_path / f".prep.old-{os.getpid()}"
    mine.write_text("mine\n")
    result = run_cli(*args, cwd=tmp_path)
    assert result.code == 0, result.err
    assert checksum(tmp_path / "prep") == first and mine.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, "m.json", "prep"])


# --- temporaries ----------------------------------------------------------------------------

_KILLED = """
import os, signal, sys
from newllm.core.artifacts import atomic_dir, atomic_path
with atomic_path(sys.argv[2]) as tmp:
    tmp.write_text("half")
    with atomic_dir(sys.argv[1]) as folder:
        (folder / "train.safetensors").write_bytes(b"half-written")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_leaves_temporaries_that_the_rerun_removes(run_cli, tmp_path, tiny_model,
                                                                mini_corpus):
    run = subprocess.run([sys.executable, "-c", _KILLED, "prep", "m.json"], cwd=tmp_path,
                         capture_output=True)
    assert run.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(n.startswith((".prep.", ".m.json.")) and n.endswith(".tmp")
                                  for n in left), left
    # a temporary of another output, and one of a live process, are left alone
    (tmp_path / ".other.12345678.tmp").write_text("not ours")
    live = tmp_path / f".m.json.{os.getppid()}.abcdefgh.tmp"
    live.write_text("a live writer's")
    result = run_cli("prepare-data", "--model", str(tiny_model), "--corpus", str(mini_corpus),
                     "--out", "prep", "--metrics", "m.json", cwd=tmp_path)
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.12345678.tmp", live.name, "m.json", "prep"])
    assert json.loads((tmp_path / "m.json").read_text())["train_documents"] > 0


def test_stale_temporaries_of_a_container_are_removed(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    stale = folder / ".hyper.999999999.abcdefgh.tmp"
    stale.mkdir()
    (stale / "x").write_text("half")
    kept = folder / "hyper.json"
    kept.write_text("{}\n")
    assert clean_stale_temporaries(folder, "container") == [stale]
    assert sorted(p.name for p in folder.iterdir()) == ["hyper.json"]


# --- benches take the stages' checks --------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (("eval-ppl", "--stride", "0"), ("--stride", "eval_ppl.stride", ">= 1")),
    (("eval-ppl", "--batch-size", "0"), ("--batch-size", "eval_ppl.batch_size")),
    (("eval-ppl", "--stride", "64", "--context-length", "32"), ("eval_ppl.stride (64)",)),
    (("e-star", "--pairs", "0"), ("--pairs", "build_e_star.batch_size")),
    (("extract-pairs", "--batch-size", "0"), ("--batch-size", "extract_pairs.batch_size")),
    (("prep-cache", "--tokens", "1"), ("--tokens", "phase2_prep_cache.train_tokens")),
    (("prep-cache", "--tokens", "10", "--naive-tokens", "20"), ("--naive-tokens",)),
], ids=lambda v: "_".join(v) if isinstance(v, tuple) and v and v[0].startswith(
    ("eval", "e-", "ext", "prep")) else None)
def test_a_bench_refuses_what_its_stage_refuses_before_loading(run_cli, tmp_path, args,
                                                              needles):
    result = run_cli("bench", *args[:1], "--model", "no-such-model", *args[1:], cwd=tmp_path)
    assert result.code == 2
    assert_one_line_error(result, *needles)


def test_bench_prep_cache_leaves_no_scratch_folder_on_failure(run_cli, tmp_path, tiny_model,
                                                              prepared_tiny, monkeypatch):
    from newllm.core.artifacts import save_artifact

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    save_artifact(tmp_path / "wrong.safetensors", {"x": torch.zeros(1)}, kind="other-kind",
                  stage="s", params={})
    result = run_cli("bench", "prep-cache", "--model", str(tiny_model), "--blocks",
                     "wrong.safetensors", "--data", str(prepared_tiny), "--tokens", "100",
                     "--naive-tokens", "50", "--rss-tokens", "50", cwd=tmp_path)
    assert_one_line_error(result, "wrong.safetensors", "other-kind")
    assert list(scratch.iterdir()) == []


# --- wording (point 6) ----------------------------------------------------------------------

def test_train_lm_names_its_own_key_for_missing_reversal_facts(run_cli, tmp_path, tiny_model,
                                                               prepared_tiny):
    result = run_cli("train-lm", "--model", str(tiny_model), "--data", str(prepared_tiny),
                     "--d-model", "8", "--n-heads", "2", "--max-train-tokens", "512",
                     "--reversal-facts", "missing.csv", "--out", "lm/model.safetensors",
                     "--metrics", "tl.json", "--plot", "tl.csv", cwd=tmp_path)
    assert_one_line_error(result, "train_lm.reversal_facts", "missing.csv")
    assert "eval_reversal" not in result.err


def test_a_misspelled_params_group_is_warned_about(run_cli, tmp_path):
    (tmp_path / "params.yaml").write_text("bogus_group:\n  x: 1\ninfini_runs: {}\n"
                                          "stages: {}\n")
    result = run_cli("eval-ppl", "--metrics", ".", cwd=tmp_path)
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.err
    assert "bogus_group" in warnings[0] and "eval_ppl" in warnings[0]
    assert "infini_runs" in warnings[0]  # known: listed, not warned about
    assert "stages" not in warnings[0].split("known groups")[0]


def test_a_truncated_safetensors_is_reported_as_truncated(run_cli, tmp_path):
    from newllm.core.artifacts import read_meta, save_artifact
    from newllm.core.errors import NewllmError

    path = tmp_path / "a.safetensors"
    save_artifact(path, {"x": torch.zeros(100)}, kind="k", stage="s", params={})
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 50])
    with pytest.raises(NewllmError, match=rf"truncated or unreadable \({len(data) - 50:,} bytes"):
        read_meta(path)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(NewllmError, match="truncated or unreadable"):
        read_meta(path)


def test_a_model_folder_without_tokenizer_files_says_so(run_cli, tmp_path, tiny_model):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    result = run_cli("prepare-data", "--model", str(folder), "--out", "p", "--metrics",
                     "m.json", cwd=tmp_path)
    assert_one_line_error(result, "has no tokenizer files", "tokenizer.json")
