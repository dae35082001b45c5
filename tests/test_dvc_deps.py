"""dvc.yaml says what DVC must know, and exactly that: every stage's code, params and options.

- Code: each stage's command module is walked for its imports inside `newllm/` (module-level
  and function-level, transitively, plus the scorer registry entry its `model_kind` selects);
  the stage's code deps are exactly `newllm/core` and the line folders those files live in.
  A forgotten line would report stale figures as up to date; a dep the stage never imports
  reruns it for nothing.
- Params: a stage lists whole groups, exactly those of its params classes (and its runs
  group when it passes `--run`), so no value can change without DVC seeing it.
- Layout: the plumbing never imports a line, and a line never imports another line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from newllm.core.cli import COMMANDS, _register, cli, lines
from newllm.core.params import group_name, read_params_file

PACKAGE = REPO / "newllm"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = {name: stage.get("do", stage) for name, stage in DVC["stages"].items()}
PARAMS = read_params_file(REPO / "params.yaml")


def module_file(name: str) -> Path | None:
    """The source file of module `name` inside newllm, or None for anything else."""
    if name != "newllm" and not name.startswith("newllm."):
        return None
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def imported_modules(path: Path, module: str) -> set[str]:
    """Names of the modules `path` imports (absolute and relative, at any depth)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import mod`
    return names


def import_closure(*modules: str) -> set[Path]:
    """Every newllm source file that importing `modules` executes, parents' __init__ included."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            prefix = ".".join(parts[:depth])
            path = module_file(prefix)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo += sorted(imported_modules(path, prefix))
    return seen


def code_folder(path: Path) -> str:
    """`newllm/core` or `newllm/<line>` for a package file (the top `__init__` counts as core)."""
    parts = path.relative_to(REPO).parts
    return "newllm/core" if len(parts) == 2 else "/".join(parts[:2])


def command_of(stage: dict) -> tuple[str, dict[str, str]]:
    """`newllm <command> --flag value ...` as the command and its flags."""
    words = stage["cmd"].split()
    assert words[0] == "newllm", stage["cmd"]
    flags = dict(re.findall(r"--([a-z0-9-]+) (\S+)", stage["cmd"]))
    return words[1], flags


def scorer_module(stage: dict) -> str | None:
    """The module of the scorer kind the stage evaluates (eval-ppl / eval-reversal)."""
    from newllm.core import ppl

    registry = next(v for k, v in vars(ppl).items()
                    if k.isupper() and isinstance(v, dict) and "hf" in v)
    command, flags = command_of(stage)
    group = command.replace("-", "_")
    kind = flags.get("model-kind", (PARAMS.get(group) or {}).get("model_kind"))
    return registry[kind].partition(":")[0] if kind in registry else None


def test_the_walk_finds_indirect_and_function_level_imports():
    closure = {p.relative_to(REPO).as_posix()
               for p in import_closure("newllm.evaluation.stages.eval_ppl")}
    # eval_ppl -> core.ppl -> core.data (word counts) -> core.artifacts
    assert {"newllm/evaluation/stages/eval_ppl.py", "newllm/core/ppl.py",
            "newllm/core/data.py", "newllm/core/artifacts.py", "newllm/__init__.py"} <= closure
    assert {code_folder(REPO / p) for p in closure} == {"newllm/core", "newllm/evaluation"}
    cvfp = scorer_module(STAGES["eval-ppl-cvfp"])
    assert cvfp is not None and cvfp.startswith("newllm.cvfp.")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_exactly_the_code_it_runs(stage):
    spec = STAGES[stage]
    command, _ = command_of(spec)
    assert command in COMMANDS, f"{stage}: no command `newllm {command}`"
    modules = [COMMANDS[command]] + ([scorer] if (scorer := scorer_module(spec)) else [])
    needed = {code_folder(p) for p in import_closure(*modules)}
    code = {d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith("newllm")}
    assert code == needed, f"dvc.yaml stage {stage}: code deps {sorted(code)}, runs " \
                           f"{sorted(needed)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_lists_exactly_the_params_groups_it_reads(stage):
    _register()
    spec = STAGES[stage]
    command, flags = command_of(spec)
    made = cli.commands[command]
    groups = {group_name(cls) for cls in made.param_classes}
    if "run" in flags:
        assert made.runs, f"{stage}: `newllm {command}` takes no --run"
        groups.add(made.runs)
    groups |= set(getattr(made, "reads_runs", ()) or ())
    assert set(spec.get("params", [])) == groups, stage
    options = {o.name.replace("_", "-") for o in made.params}
    assert set(flags) <= options, (stage, set(flags) - options)


def test_foreach_run_names_are_runs_of_their_group():
    for name, stage in DVC["stages"].items():
        foreach = stage.get("foreach")
        if isinstance(foreach, str) and "--run ${key}" in stage["do"]["cmd"]:
            group = re.fullmatch(r"\$\{(\w+)\}", foreach)[1]
            command, _ = command_of(stage["do"])
            _register()
            assert cli.commands[command].runs == group, name


def _imports_of(folder: Path) -> set[tuple[Path, str]]:
    found = set()
    for path in folder.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found |= {(path, name) for name in imported_modules(path, module)}
    return found


def test_the_plumbing_never_imports_a_line_and_lines_never_import_each_other():
    assert lines(), "no line folders found"
    for path, name in _imports_of(PACKAGE / "core"):
        assert not any(name == f"newllm.{line}" or name.startswith(f"newllm.{line}.")
                       for line in lines()), (path, name)
    for line in lines():
        for path, name in _imports_of(PACKAGE / line):
            other = [o for o in lines() if o != line and
                     (name == f"newllm.{o}" or name.startswith(f"newllm.{o}."))]
            assert not other, (path, name)
