"""One source of truth for defaults: each stage's dataclass defaults equal params.yaml.

A stage run by hand outside the repository (no params.yaml) takes its dataclass defaults;
`dvc repro` takes params.yaml. If the two drifted apart, the same command would give other
figures depending on the folder it runs from.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from newllm.core.cli import _register, cli
from newllm.core.params import field_specs, group_name

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
MATRIX_ONLY = {"infini_runs", "adapter_runs", "cvfp_grid_runs", "compressor_runs"}


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


# --- lists kept in more than one place must agree ------------------------------------------

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_compressor_runs_are_the_runs_eval_compressor_reads_and_depends_on():
    # eval-compressor reads the run names from compressor_runs itself (no copy of the list)
    assert cli.commands["eval-compressor"].reads_runs == ("compressor_runs",)
    stage = STAGES["eval-compressor"]
    assert "compressor_runs" in stage["params"]
    assert "${eval_compressor.compressors}" in stage["deps"]
    for run in PARAMS["compressor_runs"]:
        assert PARAMS["compressor_runs"][run]["arch"] in ("hyper", "qattn")


def test_infini_runs_are_the_kinds_and_the_ablations_named_by_their_settings():
    # infini-report reads both runs groups itself (no copy of the names)
    assert cli.commands["infini-report"].reads_runs == ("infini_runs", "adapter_runs")
    assert cli.commands["train-lm"].runs == "infini_runs"
    assert cli.commands["train-infini-adapter"].runs == "adapter_runs"
    runs = PARAMS["infini_runs"]
    kinds = {name: item for name, item in runs.items() if set(item) == {"kind"}}
    assert {name: item["kind"] for name, item in kinds.items()} == {
        k: k for k in ("pythia", "infini", "multi_memory", "hierarchical")}
    seeds = {name: item for name, item in runs.items() if set(item) == {"kind", "seed"}}
    for name, item in seeds.items():  # a second seed of every kind, named by it
        assert name == f"{item['kind']}_seed-{item['seed']}"
    assert {item["kind"] for item in seeds.values()} == {i["kind"] for i in kinds.values()}
    windows = {name: item for name, item in runs.items() if "segment_length" in item}
    for name, item in windows.items():  # pythia attending a whole training sequence
        assert item["kind"] == "pythia" and item["segments_per_sequence"] == 1
        assert name == f"pythia_window-{item['segment_length']}"
        assert item["segment_length"] == (PARAMS["train_lm"]["segment_length"]
                                          * PARAMS["train_lm"]["segments_per_sequence"])
    ablations = {name: item for name, item in runs.items()
                 if name not in kinds and name not in seeds and name not in windows}
    for name, item in ablations.items():
        delta, alibi = (str(item[k]).lower() for k in ("use_delta_rule", "use_alibi"))
        assert name == f"{item['kind']}_delta-{delta}_alibi-{alibi}"
    # with the infini run (train_lm's own delta / ALiBi settings) the grid is complete
    main = (PARAMS["train_lm"]["use_delta_rule"], PARAMS["train_lm"]["use_alibi"])
    cells = {(i["use_delta_rule"], i["use_alibi"]) for i in ablations.values()} | {main}
    assert cells == {(d, a) for d in (False, True) for a in (False, True)}
    assert set(PARAMS["infini_report"]["reversal_adapter_runs"]) <= set(PARAMS["adapter_runs"])


def test_the_base_is_split_as_the_trained_models_were_injected():
    fraction = PARAMS["eval_reversal"]["inject_fraction"]
    assert fraction == PARAMS["train_lm"]["reversal_inject_fraction"] \
        == PARAMS["train_infini_adapter"]["reversal_inject_fraction"]
    for run in (*PARAMS["infini_runs"].values(), *PARAMS["adapter_runs"].values()):
        assert "reversal_inject_fraction" not in run
