"""The locked environment: requirements.lock covers pyproject's dependencies with hashes,
leaves torch to its own install, and CI runs the README's test command as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# installed on its own before the lock (CPU or CUDA build), with what only the CUDA build needs
LEFT_TO_TORCH = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def _locked() -> dict[str, list[tuple[str, str]]]:
    """name -> [(version, the entry's text)] of requirements.lock (one per marker fork)."""
    text = (REPO / "requirements.lock").read_text()
    entries: dict[str, list[tuple[str, str]]] = {}
    for block in re.split(r"\n(?=\S)", text):
        if block.startswith("#") or not block.strip():
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        assert match, f"requirements.lock: not an exact pin: {block.splitlines()[0]}"
        entries.setdefault(canonicalize_name(match[1]), []).append((match[2], block))
    return entries


def _declared() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(dep) for dep in
            project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_lock_pins_every_dependency_with_hashes_within_pyproject_ranges():
    locked = _locked()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        if LEFT_TO_TORCH.match(name):
            continue
        assert name in locked, f"{name} is in pyproject.toml but not in requirements.lock"
        for version, _ in locked[name]:
            assert requirement.specifier.contains(version, prereleases=True), (name, version)
    for name, pins in locked.items():
        for version, block in pins:
            assert "--hash=sha256:" in block, f"{name}=={version} has no hash"


def test_lock_leaves_torch_and_its_cuda_packages_out():
    left_in = [name for name in _locked() if LEFT_TO_TORCH.match(name)]
    assert left_in == []
    # ...but torch's own pure-Python dependencies are locked
    assert {"sympy", "networkx", "filelock", "jinja2"} <= set(_locked())


def test_ci_runs_the_readme_test_command_as_written():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"Run the tests:\n\n```bash\n(.+?)\n```", readme, re.S)
    assert block, "README has no 'Run the tests:' command block"
    command = block[1].strip()
    assert "--require-hashes -r requirements.lock" in command
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines
