"""One source of truth for defaults: each stage's dataclass defaults equal params.yaml.

A stage run by hand outside the repository (no params.yaml) takes its dataclass defaults;
`dvc repro` takes params.yaml. If the two drifted apart, the same command would give other
figures depending on the folder it runs from.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from newllm.cli import _register, cli
from newllm.params import field_specs, group_name

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _params_classes() -> dict[str, type]:
    import dataclasses
    import sys

    _register()
    classes = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("newllm") or module is None:
            continue
        for value in list(vars(module).values()):
            if dataclasses.is_dataclass(value) and isinstance(getattr(value, "group", None), str):
                classes[group_name(value)] = value
    return classes


CLASSES = _params_classes()
# groups that only feed dvc matrices / foreach stages
MATRIX_ONLY = {"per_layer", "infini_runs", "cvfp_grid_runs", "compressor_runs"}


def test_every_params_group_has_a_dataclass_and_every_stage_a_group():
    assert set(PARAMS) - MATRIX_ONLY <= set(CLASSES)
    for name, command in cli.commands.items():
        if name in ("bench", "report"):
            continue
        groups = {o.help.split("[params: ")[1].split(".")[0] for o in command.params
                  if o.help and "[params: " in o.help}
        assert groups <= set(PARAMS), (name, groups - set(PARAMS))


@pytest.mark.parametrize("group", sorted(set(PARAMS) - MATRIX_ONLY))
def test_dataclass_defaults_equal_params_yaml(group):
    specs = {s.name: s for s in field_specs(CLASSES[group])}
    assert set(PARAMS[group]) == set(specs), f"params.yaml {group} keys differ from the stage's"
    for key, value in PARAMS[group].items():
        default = specs[key].default
        if specs[key].base is float and value is not None:
            value = float(value)
        if isinstance(value, str):
            value = " ".join(value.split())  # YAML folded text vs the Python literal
            default = " ".join(str(default).split())
        assert default == value, f"{group}.{key}: dataclass default {default!r}, " \
                                 f"params.yaml {value!r}"
