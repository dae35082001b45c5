"""Typed, validated stage parameters: one dataclass per params.yaml group.

A stage's value for a parameter comes from, in increasing priority: the
dataclass default, the stage's group in params.yaml, the command-line option.
The option name is the params key with dashes (`max_tokens` -> `--max-tokens`).
Every value is checked against its declared type, range and choices; a bad one
is a one-line error naming the file (or option) and the key.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from newllm.core.errors import NewllmError

P = TypeVar("P")


def param(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    output: str | None = None,
) -> Any:
    """Declare a parameter: its default, a help line and its allowed range or choices.

    `output` marks a path the stage writes, by kind (newllm/core/outputs.py: "metrics",
    "plot", "artifact", "dir", "container"); the stage checks it before any work starts."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if output is not None:
        from newllm.core.outputs import KINDS

        if output not in KINDS:
            raise ValueError(f"unknown output kind {output!r} (kinds: {', '.join(KINDS)})")
        meta["output"] = output
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_choices(group: str, values: tuple[tuple[str, Any, tuple[str, ...]], ...]) -> None:
    """(key, value, allowed) of a library config: a one-line error naming `group.key` for a
    value outside its choices (a config built in code, not through a stage's options)."""
    for key, value, allowed in values:
        if value not in allowed:
            raise NewllmError(f"{group}.{key} must be one of {', '.join(allowed)}, got "
                              f"{value!r}.")


def group_name(cls: type) -> str:
    """The params.yaml group of a params dataclass (its `group` class attribute)."""
    return cls.group  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FieldSpec:
    """What a value of one parameter must be, derived from the dataclass annotation."""

    name: str
    base: type  # int, float, str, bool or list
    item: Any  # a list's element type: int, float, str or int | str (an index or a name)
    optional: bool
    help: str
    min: float | None
    max: float | None
    choices: tuple[str, ...] | None
    default: Any

    def describe(self) -> str:
        kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        lists = {int: "a list of integers", float: "a list of numbers", str: "a list of strings",
                 int | str: "a list of integers or strings"}
        text = lists[self.item] if self.base is list else kinds[self.base]
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        if self.min is not None and self.max is not None:
            text += f" in [{self.min}, {self.max}]"
        elif self.min is not None:
            text += f" >= {self.min}"
        elif self.max is not None:
            text += f" <= {self.max}"
        if self.optional:
            text += " (or null)"
        return text


def field_specs(cls: type) -> list[FieldSpec]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        optional = False
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
            optional = True
            annotation = next(a for a in args if a is not type(None))
        base, item = annotation, None
        if typing.get_origin(annotation) is list:
            base, item = list, typing.get_args(annotation)[0]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        specs.append(FieldSpec(f.name, base, item, optional, f.metadata.get("help", ""),
                               f.metadata.get("min"), f.metadata.get("max"),
                               f.metadata.get("choices"), default))
    return specs


def check_value(spec: FieldSpec, value: Any, where: str) -> Any:
    """Return `value` if it fits `spec` (ints are accepted as floats); else raise NewllmError."""
    if value is None and spec.optional:
        return None
    ok = True
    if spec.base is bool:
        ok = isinstance(value, bool)
    elif spec.base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif spec.base is str:
        ok = isinstance(value, str)
    elif spec.base is list:
        ok = isinstance(value, list) and all(_is(spec.item, v) for v in value)
        value = [float(v) for v in value] if ok and spec.item is float else value
    if ok and spec.choices is not None:
        ok = all(v in spec.choices for v in value) if spec.base is list else value in spec.choices
    numbers = value if spec.base is list and spec.item in (int, float) else (
        [value] if spec.base in (int, float) else [])
    if ok:
        ok = all((spec.min is None or v >= spec.min) and (spec.max is None or v <= spec.max)
                 for v in numbers)
    if not ok:
        raise NewllmError(f"{where} must be {spec.describe()}, got {value!r}.")
    return value


def _is(kind: Any, value: Any) -> bool:
    """Whether a list element fits its element type (ints count as numbers, never bools)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)  # type: ignore[arg-type]


def read_params_file(path: Path) -> dict[str, Any]:
    """The whole params.yaml as a dict of groups; a missing file is an empty dict."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise NewllmError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NewllmError(f"{path}: expected a mapping of parameter groups at the top level.")
    return data


# dvc.yaml's own top-level keys, should a params file hold them too
DVC_KEYS = ("stages", "vars", "metrics", "plots", "params", "artifacts", "datasets")


@functools.cache
def known_groups() -> tuple[str, ...]:
    """Every params group newllm reads: the groups the params dataclasses declare and the run
    groups (`*_runs`) the stages read, found in the package's source without importing it (a
    stage must not pay for importing every line), plus the groups dvc.yaml interpolates."""
    package = Path(__file__).resolve().parent.parent
    found: set[str] = set()
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found.update(re.findall(r'^\s+group = "(\w+)"', text, flags=re.M))
        found.update(re.findall(r'"(\w+_runs)"', text))
    dvc = Path("dvc.yaml")
    if dvc.is_file():
        found.update(set(re.findall(r"\$\{\s*(\w+)", dvc.read_text(encoding="utf-8")))
                     - {"item", "key"})  # foreach's own names
    return tuple(sorted(found))


def warn_unknown_groups(file_groups: dict[str, Any], source: str) -> None:
    """One stderr line naming the top-level groups of a params file no stage reads (a
    misspelled group would otherwise be ignored without a word) and the known ones."""
    known = known_groups()
    unknown = [str(g) for g in file_groups if g not in known and g not in DVC_KEYS]
    if unknown:
        print(f"warning: {source}: unknown parameter group(s) {', '.join(unknown)} are "
              f"ignored (known groups: {', '.join(known)})", file=sys.stderr)


def read_run(file_groups: dict[str, Any], runs: str | None, run: str | None,
             classes: tuple[type, ...], source: str) -> dict[str, Any]:
    """The keys of run `run` of params group `runs` (empty without a run); a one-line error for
    a run that is not there or a key that none of the stage's `classes` has."""
    if run is None:
        return {}
    group = file_groups.get(runs)
    if not isinstance(group, dict) or not group:
        raise NewllmError(f"{source}: --run {run} needs the params group '{runs}' (a mapping "
                          "of run names to the keys they change).")
    if run not in group:
        raise NewllmError(f"{source}: {runs} has no run '{run}' (runs: {', '.join(group)}).")
    values = group[run] or {}
    if not isinstance(values, dict):
        raise NewllmError(f"{source}: {runs}.{run} must be a mapping of keys to values.")
    known = {spec.name for cls in classes for spec in field_specs(cls)}
    for key in values:
        if key not in known:
            raise NewllmError(f"{source}: {runs}.{run}.{key} is not a parameter of this stage "
                              f"(known keys: {', '.join(sorted(known))}).")
    return values


class RunNames(list):  # type: ignore[type-arg]
    """The run names of a runs group in file order (a plain list of str), and `changes`:
    {run name: the keys that run changes}."""

    changes: dict[str, dict[str, Any]]


def run_names(file_groups: dict[str, Any], runs: str, source: str) -> RunNames:
    """The run names of params group `runs`, in file order, with the keys each changes
    (`.changes`); a one-line error if it is missing, empty, or a run is not a mapping (report
    stages read the runs the pipeline made from here)."""
    group = file_groups.get(runs)
    if not isinstance(group, dict) or not group:
        raise NewllmError(f"{source}: expected params group '{runs}' to map run names to the "
                          "keys they change.")
    names = RunNames(str(name) for name in group)
    names.changes = {}
    for name, values in group.items():
        if values is not None and not isinstance(values, dict):
            raise NewllmError(f"{source}: {runs}.{name} must be a mapping of keys to values.")
        names.changes[str(name)] = dict(values or {})
    return names


def build_params(cls: type[P], file_values: dict[str, Any] | None, overrides: dict[str, Any],
                 source: str = "params.yaml", run: dict[str, Any] | None = None,
                 run_name: str = "", options: dict[str, str] | None = None) -> P:
    """Make a `cls` from its params.yaml group (`file_values`), the keys of a named run
    (`run`, from `<runs>.<name>`) and command-line `overrides`, in that order."""
    group = group_name(cls)
    specs = {s.name: s for s in field_specs(cls)}
    values: dict[str, Any] = {}
    if file_values is not None:
        if not isinstance(file_values, dict):
            raise NewllmError(f"{source}: group '{group}' must be a mapping of keys to values.")
        for key, value in file_values.items():
            if key not in specs:
                known = ", ".join(specs)
                raise NewllmError(f"{source}: {group}.{key} is not a known parameter "
                                  f"(known keys: {known}).")
            values[key] = check_value(specs[key], value, f"{source}: {group}.{key}")
    for key, value in (run or {}).items():
        values[key] = check_value(specs[key], value, f"{source}: {run_name}.{key}")
    for key, value in overrides.items():
        # `options` names a key's option where it is not the key with dashes (a bench's)
        option = (options or {}).get(key) or "--" + key.replace("_", "-")
        values[key] = check_value(specs[key], value, f"option {option} ({group}.{key})")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def as_dict(*groups: Any) -> dict[str, dict[str, Any]]:
    """Params objects as {group: {key: value}}, for provenance metadata."""
    return {group_name(type(g)): dataclasses.asdict(g) for g in groups}
