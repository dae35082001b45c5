"""The `newllm` command: a click group whose commands are the stages.

`stage_command` turns a function taking params dataclasses into a click
command with one option per parameter, so every option has a params.yaml key
and its name is that key with dashes. Errors meant for the user (NewllmError)
print as one line and exit with status 2, never with a traceback.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from newllm.errors import NewllmError
from newllm.params import build_params, field_specs, group_name, read_params_file

# Each command's module, imported only when that command runs (a stage's module registers
# itself through `stage_command`; `module:attribute` names a click command to add), so
# `newllm report` does not pay for importing torch and transformers.
COMMANDS = {
    "fetch-assets": "newllm.stages.fetch_assets",
    "prepare-data": "newllm.stages.prepare_data",
    "eval-ppl": "newllm.stages.eval_ppl",
    "extract-pairs": "newllm.stages.extract_pairs",
    "train-converter": "newllm.stages.train_converter",
    "converter-report": "newllm.stages.converter_report",
    "demo-recursive": "newllm.stages.demo_recursive",
    "build-e-star": "newllm.stages.build_e_star",
    "train-compressor": "newllm.stages.train_compressor",
    "eval-compressor": "newllm.stages.eval_compressor",
    "reconstruct-capacity": "newllm.stages.reconstruct_capacity",
    "demo-compressor": "newllm.stages.demo_compressor",
    "train-lm": "newllm.stages.train_lm",
    "eval-reversal": "newllm.stages.eval_reversal",
    "eval-memory": "newllm.stages.eval_memory",
    "infini-report": "newllm.stages.infini_report",
    "train-infini-adapter": "newllm.stages.train_infini_adapter",
    "self-generate": "newllm.stages.self_generate",
    "estimate-directions": "newllm.stages.estimate_directions",
    "eval-chameleon": "newllm.stages.eval_chameleon",
    "generate": "newllm.stages.generate",
    "phase1-context": "newllm.stages.phase1_context",
    "phase2-prep-cache": "newllm.stages.phase2_prep_cache",
    "phase2-token": "newllm.stages.phase2_token",
    "cvfp-grid": "newllm.stages.cvfp_grid",
    "bench": "newllm.bench:bench",
    "report": "newllm.report:report",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module when the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module, _, attribute = COMMANDS[name].partition(":")
            loaded = importlib.import_module(module)
            if attribute:
                self.add_command(getattr(loaded, attribute), name)
        return self.commands.get(name)


class ListOfInts(click.ParamType):
    name = "INTS"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


class ListOption(click.Option):
    """A list option whose values may also follow it space-separated (`--layers 1 15 30`).

    DVC refuses to put a list into a `cmd` (`${per_layer.layers}`) but renders a whole
    params group (`${per_layer}`) as `--layers 1 15 30`; the comma form still works.
    """

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        wrapped: set[int] = set()
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None or id(option) in wrapped:
                continue
            wrapped.add(id(option))
            process = option.process

            def greedy(value: Any, state: Any, process: Callable = process) -> None:
                values = [value]
                # take the words up to the next option (a negative number is a value)
                while state.rargs and (not state.rargs[0].startswith("-")
                                       or state.rargs[0][1:].isdigit()):
                    values.append(state.rargs.pop(0))
                process(",".join(values), state)

            option.process = greedy


class Nullable(click.ParamType):
    """An optional int, float or str: dvc.yaml renders a null param as `None`."""

    def __init__(self, base: type):
        self.base = base
        self.name = f"{base.__name__.upper()}|none"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or str(value).lower() in ("none", "null"):
            return None
        try:
            return self.base(value)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(self.base, "a value")
            self.fail(f"{value!r} is not {kind} or 'none'", param, ctx)


def _option_for(spec: Any, group: str) -> Callable:
    flag = "--" + spec.name.replace("_", "-")
    default_text = spec.default if not isinstance(spec.default, list) else ",".join(
        str(v) for v in spec.default)
    help_text = f"{spec.help} [params: {group}.{spec.name}; default: {default_text}]"
    # Booleans take a value (`--bos false`), as dvc.yaml renders `${group.key}` as true/false.
    click_type: Any = {int: int, float: float, str: str, bool: click.BOOL,
                       list: ListOfInts()}[spec.base]
    if spec.base in (int, float, str) and spec.optional:
        click_type = Nullable(spec.base)
    if spec.choices:
        click_type = click.Choice(spec.choices)
    return click.option(flag, spec.name, type=click_type, default=None, help=help_text,
                        cls=ListOption if spec.base is list else click.Option)


def stage_command(name: str, *param_classes: type, help: str) -> Callable:
    """Make `fn(*params_objects)` a `newllm <name>` command with an option per parameter."""

    def decorate(fn: Callable) -> click.Command:
        @click.pass_context
        @functools.wraps(fn)
        def command(ctx: click.Context, **options: Any) -> None:
            group_options = ctx.obj or {"params_file": "params.yaml", "params_explicit": False}
            params_file = Path(group_options["params_file"])
            if group_options["params_explicit"] and not params_file.is_file():
                # A named params file that is not there must not fall back to the defaults.
                raise NewllmError(f"--params {params_file}: no such file; expected a params "
                                  "YAML file.")
            file_groups = read_params_file(params_file)
            built = []
            for cls in param_classes:
                names = {s.name for s in field_specs(cls)}
                given = {k: v for k, v in options.items() if k in names and
                         ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
                built.append(build_params(cls, file_groups.get(group_name(cls)), given,
                                          source=str(params_file)))
            fn(*built)

        seen: set[str] = set()
        for cls in reversed(param_classes):
            for spec in reversed(field_specs(cls)):
                if spec.name in seen:
                    raise TypeError(f"{name}: parameter {spec.name} appears in two groups")
                seen.add(spec.name)
                command = _option_for(spec, group_name(cls))(command)
        return cli.command(name, help=help)(command)

    return decorate


@click.group(cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="params.yaml to take stage defaults from.")
@click.version_option(package_name="newllm")
@click.pass_context
def cli(ctx: click.Context, params_file: str) -> None:
    """newllm: reproducible research on the internal representations of language models.

    Each command is one pipeline stage (see dvc.yaml); `dvc repro` runs them all.
    Options default to the stage's group in params.yaml.
    """
    ctx.ensure_object(dict)
    ctx.obj["params_file"] = params_file
    ctx.obj["params_explicit"] = (
        ctx.get_parameter_source("params_file") != ParameterSource.DEFAULT)


def _register() -> None:
    """Import every command (tests and tools that inspect them all)."""
    for name in COMMANDS:
        cli.get_command(click.Context(cli), name)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit 2, no traceback for bad input."""
    try:
        cli.main(args=argv, prog_name="newllm", standalone_mode=False)
    except NewllmError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option or value: one line, like NewllmError
        where = exc.ctx.command_path if exc.ctx is not None else "newllm"
        click.echo(f"error: {where}: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
