"""dvc.yaml stages depend on all the code they run, so a code change reruns them.

Each stage's command module is walked for its imports inside `newllm/` (module-level and
function-level, transitively); every file reached must be a dvc.yaml dep of the stage, as a
file or under a folder dep. A stage that forgets a module would report stale figures as
"up to date" after that module changes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PACKAGE = REPO / "newllm"


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


def import_closure(module: str) -> set[Path]:
    """Every newllm source file that importing `module` executes, parents' __init__ included."""
    seen: set[Path] = set()
    todo = [module]
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


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_the_walk_finds_indirect_and_function_level_imports():
    closure = {p.relative_to(REPO).as_posix() for p in import_closure("newllm.evaluation.stages.eval_ppl")}
    # eval_ppl -> ppl -> data (word counts) -> artifacts; base is imported by the stage
    assert {"newllm/stages/eval_ppl.py", "newllm/ppl.py", "newllm/data.py",
            "newllm/artifacts.py", "newllm/base.py", "newllm/__init__.py"} <= closure
    assert not covered(PACKAGE / "ppl.py", ["newllm/stages", "newllm/data.py"])
    assert covered(PACKAGE / "stages" / "eval_ppl.py", ["newllm/stages"])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_runs(stage):
    spec = STAGES[stage].get("do", STAGES[stage])  # a foreach stage's body sits under `do`
    command = spec["cmd"].split()[1]  # "newllm <command> ..."
    module = "newllm.stages." + command.replace("-", "_")
    assert module_file(module) is not None, f"{stage}: no module for `newllm {command}`"
    deps = [d for d in spec.get("deps", []) if isinstance(d, str)]
    missing = sorted(p.relative_to(REPO).as_posix() for p in import_closure(module)
                     if p.read_text().strip() and not covered(p, deps))  # empty __init__: no code
    assert not missing, f"dvc.yaml stage {stage} runs these files but does not depend on them"
