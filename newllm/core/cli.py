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
import yaml
from click.core import ParameterSource

from newllm.core.errors import NewllmError
from newllm.core.outputs import check_outputs
from newllm.core.params import (
    build_params,
    check_value,
    field_specs,
    group_name,
    read_params_file,
    read_run,
    run_names,
    warn_unknown_groups,
)

PACKAGE = Path(__file__).resolve().parent.parent

# The lines of research are the folders of the package beside `core/`; a line's stages are
# the modules of its `stages/` folder, one per command (`eval_ppl.py` is `newllm eval-ppl`),
# found on disk and imported only when that command runs, so `newllm report` does not pay
# for importing torch and transformers. `bench` and `report` are the plumbing's own.
OWN_COMMANDS = {"bench": "newllm.core.bench:bench", "report": "newllm.core.report:report"}


def lines() -> list[str]:
    """The package's lines of research: every folder beside `core/` that is a package."""
    return sorted(p.name for p in PACKAGE.iterdir()
                  if p.is_dir() and p.name != "core" and not p.name.startswith(("_", "."))
                  and (p / "__init__.py").exists())


def stage_modules() -> dict[str, str]:
    """{command: module} of every stage shell of every line."""
    found: dict[str, str] = {}
    for line in lines():
        for path in sorted((PACKAGE / line / "stages").glob("[a-z]*.py")):
            command = path.stem.replace("_", "-")
            if command in found or command in OWN_COMMANDS:
                raise RuntimeError(f"two stages are named {command}: {found.get(command)} "
                                   f"and newllm.{line}.stages.{path.stem}")
            found[command] = f"newllm.{line}.stages.{path.stem}"
    return found


COMMANDS = {**stage_modules(), **OWN_COMMANDS}


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


def _number(text: str) -> Any:
    """`1e-3` as a float (YAML 1.1 wants `1.0e-3`); any other text stays text."""
    try:
        return float(text)
    except ValueError:
        return text


def _yaml_value(spec: Any, group: str) -> Callable[[Any, Any, Any], Any]:
    """An option's text as its params.yaml value would be written (`null`, `false`, `[1, 2]`);
    a string parameter takes the text as it is (or `null` where it may be null). The value is
    checked by the same rules as params.yaml's, as a usage error of the option."""

    def convert(ctx: Any, param: Any, value: Any) -> Any:
        if value is None:  # not given: params.yaml's value stands
            return None
        parsed = _parse(value)
        try:
            return check_value(spec, parsed, f"{group}.{spec.name}")
        except NewllmError as exc:
            raise click.BadParameter(str(exc).removesuffix(".")) from None

    def _parse(value: Any) -> Any:
        if value is None:
            return None
        if spec.base is str:
            return None if spec.optional and value in ("null", "~") else value
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise click.BadParameter(f"{value!r} is not a YAML value") from None
        if isinstance(parsed, str) and (spec.base is float or spec.item is float):
            parsed = _number(parsed)  # YAML 1.1 reads `1e-3` as text
        if spec.base is list and isinstance(parsed, list) and spec.item is float:
            parsed = [_number(v) if isinstance(v, str) else v for v in parsed]
        if spec.base is list and not isinstance(parsed, list) and parsed is not None:
            parsed = [parsed]  # one element without brackets
        return parsed

    return convert


def _option_for(spec: Any, group: str) -> Callable:
    flag = "--" + spec.name.replace("_", "-")
    default = "null" if spec.default is None else yaml.safe_dump(
        spec.default, default_flow_style=True).strip().removesuffix("...").strip()
    help_text = f"{spec.help} [params: {group}.{spec.name}; default: {default}]"
    metavar = {int: "INT", float: "NUMBER", str: "TEXT", bool: "true|false",
               list: "[A, B, ...]"}[spec.base]
    if spec.choices and spec.base is str:
        metavar = "|".join(spec.choices)
    return click.option(flag, spec.name, type=str, default=None, help=help_text,
                        metavar=metavar + ("|null" if spec.optional else ""),
                        callback=_yaml_value(spec, group))


def stage_command(name: str, *param_classes: type, help: str, runs: str | None = None,
                  reads_runs: tuple[str, ...] = ()) -> Callable:
    """Make `fn(*params_objects)` a `newllm <name>` command with an option per parameter.

    With `runs`, the command also takes `--run NAME`: the keys of `<runs>.NAME` in params.yaml
    override the stage's groups (dvc.yaml's foreach over that group passes only the name), and
    the command line overrides both.

    With `reads_runs` (names of run groups, e.g. `("compressor_runs",)`), the stage reads the
    run names of each such params group: `fn` is called with the keyword argument of the
    group's name, the list of its run names in file order (`run_names`; a missing or empty
    group is a one-line error). A report stage reads the runs the pipeline made from there
    instead of keeping a copy; its dvc.yaml `params:` lists the group too.
    """

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
            warn_unknown_groups(file_groups, str(params_file))
            run = options.pop("run", None)
            run_values = read_run(file_groups, runs, run, param_classes, str(params_file))
            run_lists = {group: run_names(file_groups, group, str(params_file))
                         for group in reads_runs}
            built = []
            for cls in param_classes:
                names = {s.name for s in field_specs(cls)}
                given = {k: v for k, v in options.items() if k in names and
                         ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
                built.append(build_params(cls, file_groups.get(group_name(cls)), given,
                                          source=str(params_file),
                                          run={k: v for k, v in run_values.items()
                                               if k in names}, run_name=f"{runs}.{run}"))
            # Every output is checked (and its stale temporaries removed) before any work.
            check_outputs(built)
            fn(*built, **run_lists)

        seen: set[str] = set()
        for cls in reversed(param_classes):
            for spec in reversed(field_specs(cls)):
                if spec.name in seen:
                    raise TypeError(f"{name}: parameter {spec.name} appears in two groups")
                seen.add(spec.name)
                command = _option_for(spec, group_name(cls))(command)
        if runs is not None:
            command = click.option("--run", "run", default=None, metavar="NAME",
                                   help=f"A named run of params group `{runs}`: its keys "
                                        "override the stage's own.")(command)
        made = cli.command(name, help=help)(command)
        made.param_classes = param_classes  # type: ignore[attr-defined]  # for tests and tools
        made.runs = runs  # type: ignore[attr-defined]
        made.reads_runs = reads_runs  # type: ignore[attr-defined]
        return made

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
