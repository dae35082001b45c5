"""Artifacts: round trip, atomic writes, provenance checks, no pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from newllm.core.artifacts import atomic_dir, load_artifact, read_meta, save_artifact
from newllm.core.errors import NewllmError

BASE_A = {"model_id": "model-a", "weights_hash": "a" * 64, "tokenizer_hash": "t" * 64}
BASE_B = {"model_id": "model-b", "weights_hash": "b" * 64, "tokenizer_hash": "u" * 64}


def _save(path, base=BASE_A, **extra):
    tensors = {"X": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "ids": torch.tensor([5, 6, 7], dtype=torch.int64)}
    save_artifact(path, tensors, kind="pairs", stage="extract-pairs",
                  params={"extract_pairs": {"layer_index": -1}}, base=base, extra=extra)
    return tensors


def test_round_trip_keeps_tensors_and_provenance(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors = _save(path, layer=3)
    artifact = load_artifact(path, kind="pairs", base=BASE_A)
    for name, tensor in tensors.items():
        assert torch.equal(artifact[name], tensor) and artifact[name].dtype == tensor.dtype
    meta = artifact.meta
    assert meta["stage"] == "extract-pairs" and meta["base"] == BASE_A
    assert meta["params"] == {"extract_pairs": {"layer_index": -1}}
    assert meta["shapes"] == {"X": [3, 4], "ids": [3]} and meta["extra"] == {"layer": 3}
    assert "torch" in meta["versions"]
    sidecar = json.loads((tmp_path / "a.safetensors.json").read_text())
    assert sidecar == meta


def test_same_inputs_give_byte_identical_files(tmp_path):
    _save(tmp_path / "one.safetensors")
    _save(tmp_path / "two.safetensors")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert one.read_bytes() == two.read_bytes()
    assert Path(f"{one}.json").read_bytes() == Path(f"{two}.json").read_bytes()


def test_writer_failing_half_way_leaves_no_file(tmp_path, monkeypatch):
    import newllm.core.artifacts as artifacts

    path = tmp_path / "out.safetensors"
    original = artifacts.Path.write_bytes

    def broken_write(target, data):
        original(target, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.Path, "write_bytes",
                        lambda self, data: broken_write(self, data) if self.suffix == ".tmp"
                        else original(self, data))
    with pytest.raises(OSError):
        _save(path)
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failing_keeps_previous_output(tmp_path):
    out = tmp_path / "prepared"
    with atomic_dir(out) as tmp:
        (tmp / "train.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "train.bin").write_text("half")
        raise RuntimeError("killed")
    assert (out / "train.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_other_base_model_is_rejected_naming_both(tmp_path):
    path = tmp_path / "a.safetensors"
    _save(path)
    with pytest.raises(NewllmError) as error:
        load_artifact(path, kind="pairs", base=BASE_B)
    message = str(error.value)
    assert "model-a" in message and "model-b" in message and str(path) in message


def test_wrong_kind_is_rejected(tmp_path):
    path = tmp_path / "a.safetensors"
    _save(path)
    with pytest.raises(NewllmError, match="'pairs' artifact, expected 'converter'"):
        load_artifact(path, kind="converter")


def test_missing_artifact_names_the_file(tmp_path):
    with pytest.raises(NewllmError, match="does not exist"):
        load_artifact(tmp_path / "nope.safetensors", kind="pairs")


def test_pickle_files_are_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"X": Boom()}))
    with pytest.raises(NewllmError, match="not a safetensors file"):
        read_meta(path)


def test_foreign_safetensors_without_metadata_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"X": torch.zeros(2)}, path)
    with pytest.raises(NewllmError, match="not written by newllm"):
        load_artifact(path, kind="pairs")


def _warnings(err):
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_same_versions_and_threads_load_silently(tmp_path, capsys):
    path = tmp_path / "a.safetensors"
    _save(path)
    assert read_meta(path)["runtime"] == {"torch_threads": torch.get_num_threads()}
    capsys.readouterr()
    load_artifact(path, kind="pairs")
    assert capsys.readouterr().err == ""


def test_other_library_version_warns_in_one_line(tmp_path, capsys, monkeypatch):
    import transformers

    path = tmp_path / "a.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(transformers, "__version__", "5.23.0")
        tensors = _save(path)
    now = transformers.__version__
    capsys.readouterr()
    artifact = load_artifact(path, kind="pairs", base=BASE_A)  # still usable
    assert torch.equal(artifact["X"], tensors["X"])
    lines = _warnings(capsys.readouterr().err)
    assert lines == [f"warning: {path} was made with transformers 5.23.0, this is "
                     f"transformers {now}; figures may differ"]


def test_other_thread_count_warns(tmp_path, capsys):
    path = tmp_path / "a.safetensors"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        _save(path)
    finally:
        torch.set_num_threads(threads)
    assert read_meta(path)["runtime"]["torch_threads"] == threads + 1
    capsys.readouterr()
    load_artifact(path, kind="pairs")
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1
    assert f"torch threads {threads + 1}, this is torch threads {threads};" in lines[0]


def test_artifact_without_runtime_record_loads_silently(tmp_path, capsys):
    """Artifacts written before thread counts were recorded compare on versions only."""
    from safetensors.torch import save_file

    from newllm.core.artifacts import library_versions

    path = tmp_path / "old.safetensors"
    meta = {"kind": "pairs", "stage": "s", "params": {}, "base": None, "shapes": {},
            "versions": library_versions(), "extra": {}}
    save_file({"X": torch.zeros(2)}, path, metadata={"newllm": json.dumps(meta)})
    capsys.readouterr()
    load_artifact(path, kind="pairs")
    assert capsys.readouterr().err == ""
