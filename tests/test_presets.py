"""presets/*.yaml are complete params files: swapping one in is a single copy.

Each preset must have exactly params.yaml's groups and keys (a key missing from a preset
would silently take the stage's default; an extra one would be refused by the stage), and
every value must pass the same validation as params.yaml's: the stage's dataclass checks
for a stage group, the run checks for a `*_runs` group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from test_params_defaults import CLASSES, MATRIX_ONLY

from newllm.core.cli import _register, cli
from newllm.core.errors import NewllmError
from newllm.core.params import build_params, read_params_file, read_run

PARAMS = read_params_file(REPO / "params.yaml")
PRESETS = sorted((REPO / "presets").glob("*.yaml"))


def keys(groups: dict) -> dict[str, set[str]]:
    return {name: set(value) if isinstance(value, dict) else {repr(value)}
            for name, value in groups.items()}


def test_there_is_a_gpu_preset():
    assert REPO / "presets" / "gpu.yaml" in PRESETS


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_preset_has_exactly_the_keys_of_params_yaml(preset: Path):
    groups = read_params_file(preset)
    assert set(groups) == set(PARAMS), preset.name
    for name in PARAMS:
        if name in MATRIX_ONLY:
            continue
        assert set(groups[name]) == set(PARAMS[name]), (preset.name, name)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_preset_passes_the_stages_validation(preset: Path):
    groups = read_params_file(preset)
    for name, cls in CLASSES.items():
        if name in groups:
            build_params(cls, groups[name], {}, source=str(preset))
    _register()
    for command in cli.commands.values():
        runs = getattr(command, "runs", None)
        for run in (groups.get(runs) or {}) if runs else ():
            read_run(groups, runs, run, command.param_classes, str(preset))


def test_validation_refuses_a_bad_preset_value(tmp_path):
    bad = dict(read_params_file(REPO / "presets" / "gpu.yaml"))
    bad["eval_ppl"] = {**bad["eval_ppl"], "stride": 0}
    with pytest.raises(NewllmError, match=r"eval_ppl\.stride"):
        build_params(CLASSES["eval_ppl"], bad["eval_ppl"], {}, source="gpu.yaml")


def test_the_gpu_preset_runs_on_cuda_in_bfloat16():
    groups = read_params_file(REPO / "presets" / "gpu.yaml")
    assert groups["base"]["device"] == "cuda"
    dtypes = {name: group["compute_dtype"] for name, group in groups.items()
              if isinstance(group, dict) and "compute_dtype" in group}
    # the context cache's recurrence stays exact and the capacity curve measures what one
    # float32 vector can hold (as the seed did); every other trainer computes in bf16
    assert {n for n, d in dtypes.items() if d != "bfloat16"} == {"phase2_prep_cache",
                                                               "reconstruct_capacity"}, dtypes
