"""The output guard: what a stage may write over, checked before any work starts.

Every output parameter is declared with `param(..., output=KIND)`; `stage_command` checks
them all once the params are built and before the stage function runs. An output that
exists is replaced only if it is recognisably one newllm wrote:

- "metrics": a JSON file in the form `write_json` writes (sorted keys, indent 2);
- "plot": a CSV file with one header row of lower-case column names and rows of its width;
- "artifact": a `.safetensors` file with newllm metadata (plus its `<file>.json` sidecar);
- "gguf": a GGUF file (eval-chameleon's llama.cpp control vector);
- "dir": an artifact folder, replaced whole: empty, or holding only such files (and a
  `.jsonl` beside a `.safetensors` of the same name), or subfolders of them;
- "container": a folder the stage writes per-run outputs into (`metrics_dir`, `out_dir`):
  it must hold only what newllm writes (and `.gitignore`), as "dir", but is never replaced.

Anything else is a one-line NewllmError naming the path and what is there: a user's file
where a metrics file would go, a folder holding foreign files, a file where a folder goes, a
folder where a file goes, the working folder or a folder above it. Parents that do not exist
are fine (the writers make them); nothing is created or changed here except stale temporary
files of these outputs (`.NAME.<pid>.XXXXXXXX.tmp` of a process that is gone), removed by
`clean_stale_temporaries`. Pure Python: no torch, so `newllm report` stays light.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from newllm.core.errors import NewllmError

KINDS = ("metrics", "plot", "artifact", "gguf", "dir", "container")
_WHAT = {"metrics": "a metrics JSON file", "plot": "a plot CSV file",
         "gguf": "a GGUF control vector",
         "artifact": "a .safetensors artifact", "dir": "an artifact folder",
         "container": "an output folder"}
# the temporaries of core/artifacts.py: `.NAME.PID.XXXXXXXX.tmp` (and `.NAME.XXXXXXXX.tmp`,
# the form before the PID was part of the name)
TEMP = re.compile(r"\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp")
_COLUMN = re.compile(r"[a-z][a-z0-9_]*")
_MAX_DEPTH = 4


def temp_prefix(path: Path) -> str:
    """The prefix of a temporary beside `path`: hidden, this output's name and this PID."""
    return f".{path.name}.{os.getpid()}."


# --- recognising what newllm writes ---------------------------------------------------------

def is_newllm_json(path: Path) -> bool:
    """A JSON file exactly as `write_json` writes it."""
    try:
        text = path.read_text(encoding="utf-8")
        return text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    except (OSError, ValueError):
        return False


def is_newllm_csv(path: Path) -> bool:
    """A CSV file as `write_csv` writes it: a header of column names, rows of its width."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, ValueError, csv.Error):
        return False
    return bool(rows) and all(_COLUMN.fullmatch(c) for c in rows[0]) and all(
        len(r) == len(rows[0]) for r in rows)


def is_gguf(path: Path) -> bool:
    """A GGUF file (the control vector eval-chameleon exports for llama.cpp)."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a `.safetensors` file, or None if it is not one (or is cut short)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return None
            length = int.from_bytes(head, "little")
            if length > min(size - 8, 100_000_000):
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    ends = [entry.get("data_offsets", [0, 0])[1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)]
    if 8 + length + max(ends, default=0) > size:
        return None
    return header


def newllm_artifact_kind(path: Path) -> str | None:
    """The kind of a newllm artifact, or None for anything else."""
    header = safetensors_header(path)
    meta = (header or {}).get("__metadata__") or {}
    try:
        kind = json.loads(meta.get("newllm", "null") or "null")
    except ValueError:
        return None
    return kind.get("kind") if isinstance(kind, dict) else None


def _is_temporary(name: str) -> bool:
    return TEMP.fullmatch(name) is not None


def foreign_entries(folder: Path, depth: int = 0) -> list[str]:
    """What in `folder` newllm did not write (names relative to `folder`, sorted)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return [folder.name]
    names = {p.name for p in entries}
    foreign: list[str] = []
    for entry in entries:
        name = entry.name
        if _is_temporary(name):
            continue
        if entry.is_symlink():
            foreign.append(name)
        elif entry.is_dir():
            if (entry / "newllm_asset.json").is_file() and is_newllm_json(
                    entry / "newllm_asset.json"):
                continue  # an unpacked asset (fetch-assets): its marker says it is newllm's
            if depth >= _MAX_DEPTH:
                foreign.append(name + "/")
                continue
            inside = foreign_entries(entry, depth + 1)
            if inside:
                foreign += [f"{name}/{sub}" for sub in inside]
            elif not any(not _is_temporary(p.name) for p in entry.iterdir()):
                foreign.append(name + "/")  # an empty folder newllm never makes: the user's
        elif name.endswith(".safetensors"):
            if newllm_artifact_kind(entry) is None:
                foreign.append(name)
        elif name.endswith(".json"):
            if not is_newllm_json(entry):
                foreign.append(name)
        elif name.endswith(".csv"):
            if not is_newllm_csv(entry):
                foreign.append(name)
        elif name.endswith(".jsonl"):
            sibling = entry.with_suffix(".safetensors")
            if sibling.name not in names or newllm_artifact_kind(sibling) is None:
                foreign.append(name)
        else:
            foreign.append(name)
    return foreign


# --- the checks -----------------------------------------------------------------------------

def _is_project_or_above(path: Path) -> bool:
    try:
        resolved, here = path.resolve(), Path.cwd().resolve()
    except OSError:
        return False
    return resolved == here or resolved in here.parents


def _check_parents(path: Path, where: str) -> None:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NewllmError(f"{where} {path}: {parent} is a file, expected a folder; "
                                  "nothing was written.")
            return


def check_output(path: str | Path, kind: str, where: str,
                 only: re.Pattern[str] | None = None, writer: str = "newllm") -> None:
    """Stop, naming `path` and what is there, unless newllm may write `kind` at `path`.

    `only`: the names a "dir" may hold (a report folder: README.md and PNGs), instead of
    what newllm's artifacts look like; `writer` names who writes them in the message."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    what = _WHAT[kind]
    if str(path) == "" or _is_project_or_above(path):
        held = [p.name for p in sorted(Path(path or ".").iterdir(),
                                       key=lambda p: (p.is_dir(), p.name))]
        shown = f" (holding {', '.join(held[:3])}{', ...' if len(held) > 3 else ''})" \
            if held else ""
        raise NewllmError(f"{where} {str(path) or repr('')}: is the working folder or a folder "
                          f"above it{shown}; expected a new path for {what} inside it "
                          "(nothing was changed).")
    _check_parents(path, where)
    if not (path.exists() or path.is_symlink()):
        return
    if kind in ("dir", "container"):
        if not path.is_dir():
            raise NewllmError(f"{where} {path}: is a file, where {what} goes (nothing was "
                              "changed).")
        foreign = ([p.name for p in sorted(path.iterdir()) if not only.fullmatch(p.name)]
                   if only is not None else foreign_entries(path))
        if kind == "container":
            foreign = [name for name in foreign if name != ".gitignore"]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                              if len(foreign) > 3 else "")
            raise NewllmError(f"{where} {path}: the folder holds files {writer} did not write "
                              f"({shown}); choose an empty folder or a new path (nothing was "
                              "changed).")
        return
    if path.is_dir():
        raise NewllmError(f"{where} {path}: is a folder, where {what} goes (nothing was "
                          "changed).")
    if path.is_symlink():
        raise NewllmError(f"{where} {path}: is a link; expected {what} newllm wrote or a new "
                          "path (nothing was changed).")
    recognised = {"metrics": is_newllm_json, "plot": is_newllm_csv, "gguf": is_gguf,
                  "artifact": lambda p: newllm_artifact_kind(p) is not None}[kind](path)
    if not recognised:
        raise NewllmError(f"{where} {path}: holds a file newllm did not write (not {what} of "
                          "the form newllm writes); choose another path or remove it "
                          "(nothing was changed).")
    if kind == "artifact":
        sidecar = Path(f"{path}.json")
        if sidecar.is_dir() or (sidecar.exists() and not is_newllm_json(sidecar)):
            raise NewllmError(f"{where} {path}: its sidecar {sidecar} is not one newllm "
                              "wrote; choose another path or remove it (nothing was changed).")


def output_fields(params: Any) -> list[tuple[str, str, str]]:
    """(name, kind, value) of each output parameter of a params dataclass object."""
    found = []
    for f in dataclasses.fields(params):
        kind = f.metadata.get("output")
        value = getattr(params, f.name)
        if kind is not None and value is not None:
            found.append((f.name, kind, str(value)))
    return found


def check_outputs(params_objects: Iterable[Any]) -> list[tuple[Path, str]]:
    """Check every output of a stage (its params objects), then remove their stale
    temporaries; (path, kind) of each output. Two outputs at one path are refused too."""
    outputs: list[tuple[Path, str]] = []
    seen: dict[Path, str] = {}
    for params in params_objects:
        for name, kind, value in output_fields(params):
            option = "--" + name.replace("_", "-")
            check_output(value, kind, option)
            key = Path(os.path.abspath(value))
            if key in seen:
                raise NewllmError(f"{option} {value}: the same path as {seen[key]}; each "
                                  "output needs its own path.")
            seen[key] = option
            outputs.append((Path(value), kind))
    for path, kind in outputs:
        clean_stale_temporaries(path, kind)
    return outputs


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_TAIL = re.compile(r"(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp")


def _stale(entry: Path, names: set[str] | None) -> bool:
    """A temporary of one of `names` (any output, for None) whose process is gone."""
    if names is None:
        match = TEMP.fullmatch(entry.name)
    else:
        match = next((m for n in names if entry.name.startswith(f".{n}.")
                      for m in [_TAIL.fullmatch(entry.name[len(n) + 2:])] if m), None)
    if match is None:
        return False
    pid = match["pid"]
    return pid is None or not _alive(int(pid))


def clean_stale_temporaries(path: Path, kind: str) -> list[Path]:
    """Remove the hidden temporaries a killed run left of this output (and, for a container,
    of any output in it); those of a live process are left alone. Returns what was removed."""
    targets: list[tuple[Path, set[str] | None]] = []
    names = {path.name, f"{path.name}.json"} if kind == "artifact" else {path.name}
    targets.append((path.parent, names))
    if kind == "container" and path.is_dir():
        targets.append((path, None))
    removed = []
    for folder, wanted in targets:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_symlink() or not _stale(entry, wanted):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
