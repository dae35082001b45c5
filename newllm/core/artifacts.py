"""The one way to write and read artifacts, metrics and plot data.

An artifact is a `.safetensors` file. Its metadata holds one key, `newllm`, a
JSON document with the artifact kind, the producing stage and its params, the
base model's identity (id, weights hash, tokenizer hash), tensor shapes, library
versions and torch's CPU thread count (float32 sums on CPU depend on it); reading
an artifact made with other versions or threads warns on stderr, it never fails.
A human-readable copy goes to a JSON sidecar (`<file>.json`)
that nothing reads back. Both are deterministic (no creation time: git and
dvc.lock date a run), so the same inputs give byte-identical outputs and DVC
skips the stages downstream of a rerun that changed nothing.

Writes are atomic: a temporary name in the same folder, then a rename.
Nothing here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import save as safetensors_bytes

from newllm import __version__
from newllm.core.errors import NewllmError
from newllm.core.outputs import safetensors_header, temp_prefix

METADATA_KEY = "newllm"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _make_parent(path: Path) -> None:
    """Create the folder `path` goes in; a file standing where a folder must be is bad input."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NewllmError(f"cannot write {path}: {path.parent} or a folder above it is a "
                          "file, expected a folder.") from None


def _check_target(path: Path, folder: bool) -> None:
    """The last guard before a write (stages check their outputs up front, in
    newllm/core/outputs.py): never a nameless path, never a folder where a file goes or a
    file where a folder goes."""
    if not path.name or path.name in (".", ".."):
        raise NewllmError(f"cannot write {path}: expected a path with a name, not a folder "
                          "such as '.'.")
    if folder and (path.exists() or path.is_symlink()) and not path.is_dir():
        raise NewllmError(f"cannot write the folder {path}: a file is there; nothing was "
                          "changed.")
    if not folder and path.is_dir():
        raise NewllmError(f"cannot write {path}: a folder is there, expected a file; nothing "
                          "was changed.")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary, `.NAME.PID.XXXXXXXX.tmp`, is removed on any failure; one a killed run
    left is removed when a stage with this output starts again (core/outputs.py)."""
    path = Path(path)
    _check_target(path, folder=False)
    _make_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds.

    The old folder is first moved into a fresh temporary of its own (a unique name, so no
    file of the user's is ever in the way), then removed; every temporary is removed on any
    failure, and one a killed run left is removed when the stage starts again."""
    path = Path(path)
    _check_target(path, folder=True)
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    holder: Path | None = None
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)
        _check_target(path, folder=True)
        if path.is_dir():
            holder = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp",
                                           dir=path.parent))
            os.replace(path, holder / "old")
        os.replace(tmp, path)
    finally:
        for folder in (tmp, holder):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)


def read_json(path: str | Path, expected: str, missing: str = "") -> Any:
    """The JSON value of `path`; one-line errors naming the file and `expected` (what it should
    hold) for a missing file (`missing` says how to make it), bad UTF-8 or bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise NewllmError(f"{path} does not exist; {missing or 'expected ' + expected}.")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise NewllmError(f"{path}: not valid UTF-8 (byte offset {exc.start}); expected "
                          f"{expected}.") from None
    except json.JSONDecodeError as exc:
        raise NewllmError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected "
                          f"{expected}.") from None


def read_json_object(path: str | Path, expected: str, missing: str = "") -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object."""
    data = read_json(path, expected, missing)
    if not isinstance(data, dict):
        raise NewllmError(f"{path}: expected a JSON object ({expected}).")
    return data


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic, stable JSON (sorted keys, trailing newline)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """A flat metrics JSON file for `dvc metrics show`."""
    for key, value in metrics.items():
        if isinstance(value, (dict, list)):
            raise TypeError(f"metrics must be flat; {key} is a {type(value).__name__}")
    write_json(path, metrics)


def write_csv(path: str | Path, header: list[str], rows: list[list[Any]]) -> None:
    """Atomic CSV with a header row (plot data for `dvc plots`)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def library_versions() -> dict[str, str]:
    import transformers

    return {"newllm": __version__, "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def runtime_settings() -> dict[str, Any]:
    """What besides library versions can change float32 CPU figures: the thread count
    decides how torch splits (and so rounds) its sums."""
    return {"torch_threads": torch.get_num_threads()}


def provenance_difference(meta: dict[str, Any]) -> str | None:
    """'transformers 5.23.0, ...' then vs now, or None when the artifact's recorded
    versions and settings match this process (unrecorded ones are not compared)."""
    recorded: dict[str, Any] = {**(meta.get("versions") or {}), **(meta.get("runtime") or {})}
    current: dict[str, Any] = {**library_versions(), **runtime_settings()}
    differ = [key for key in sorted(current) if key in recorded and recorded[key] != current[key]]
    if not differ:
        return None

    def describe(values: dict[str, Any]) -> str:
        return ", ".join(f"{key.replace('_', ' ')} {values[key]}" for key in differ)

    return f"made with {describe(recorded)}, this is {describe(current)}"


def warn_if_made_elsewhere(path: Path, meta: dict[str, Any]) -> None:
    """One stderr line when the artifact came from other library versions or thread count:
    a rerun may not reproduce its figures exactly, but it is still usable."""
    difference = provenance_difference(meta)
    if difference:
        print(f"warning: {path} was {difference}; figures may differ", file=sys.stderr)


@dataclass(frozen=True)
class Artifact:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def save_artifact(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    stage: str,
    params: dict[str, Any],
    base: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write tensors + provenance to `path` atomically (plus a `<path>.json` sidecar)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {
        "kind": kind,
        "stage": stage,
        "params": params,
        "base": base,
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "versions": library_versions(),
        "runtime": runtime_settings(),
        "extra": extra or {},
    }
    blob = safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    write_bytes_atomic(path, blob)
    write_json(Path(f"{path}.json"), meta)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The provenance metadata of an artifact, without reading its tensors."""
    path = Path(path)
    _check_exists(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception:
        raise NewllmError(_unreadable(path)) from None
    if raw is None:
        raise NewllmError(f"{path} has no newllm metadata; it was not written by newllm.")
    return json.loads(raw)


def load_artifact(
    path: str | Path,
    *,
    kind: str,
    base: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Artifact:
    """Read an artifact, checking its kind and (if `base` is given) that it came from that base."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("kind") != kind:
        raise NewllmError(f"{path} is a '{meta.get('kind')}' artifact, expected '{kind}'.")
    if base is not None:
        check_same_base(path, meta.get("base"), base)
    warn_if_made_elsewhere(path, meta)
    with safetensors.safe_open(str(path), framework="pt", device=str(device)) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return Artifact(tensors, meta, path)


def check_same_base(path: Path, made_with: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    """Stop unless the artifact's base model (weights, or tokenizer only) matches `expected`.

    An artifact that records only a tokenizer (prepared data) is checked on the
    tokenizer alone; one that records weights is checked on the weights.
    """
    if made_with is None:
        raise NewllmError(f"{path} records no base model; expected one made with "
                          f"'{expected['model_id']}'.")
    key = "weights_hash" if made_with.get("weights_hash") else "tokenizer_hash"
    if made_with.get(key) != expected.get(key):
        what = "weights" if key == "weights_hash" else "tokenizer"
        raise NewllmError(
            f"{path} was made with base model '{made_with.get('model_id')}' "
            f"({what} {str(made_with.get(key))[:12]}) but the base model now is "
            f"'{expected['model_id']}' ({what} {str(expected.get(key))[:12]}); "
            f"re-run the stage that made it.")


def _unreadable(path: Path) -> str:
    """Why a `.safetensors` file cannot be read: cut short (its size) or not one at all."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})."
    if len(head) == 8 and safetensors_header(path) is None:
        length = int.from_bytes(head, "little")
        if length < 100_000_000 and (size < 8 + length or _header_is_json(path, length)):
            return (f"{path} is truncated or unreadable ({size:,} bytes, shorter than its "
                    "header says); re-run the stage that makes it.")
    return (f"{path} is not a safetensors file ({size:,} bytes; newllm never unpickles); "
            "re-run the stage that makes it.")


def _header_is_json(path: Path, length: int) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(8)
            return isinstance(json.loads(handle.read(length)), dict)
    except (OSError, ValueError):
        return False


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise NewllmError(f"{path} does not exist; run the stage that makes it first.")
    if path.is_dir():
        raise NewllmError(f"{path} is a folder, expected a .safetensors file.")
