"""`newllm report`: the headline figures of every line of research, and the plots.

Reads the metrics files and plot data that `dvc.yaml` declares (with `${...}`
resolved against params.yaml and `matrix`/`foreach` stages expanded by a small
resolver here: DVC's own index costs about a second to load), prints one table
per headline that the lines declare (`newllm.core.headlines.headlines()`, each line's
`newllm/<line>/headlines.py`), at most `WIDTH` columns wide, and writes `<out>/README.md`
(the same tables in Markdown, plots embedded) with one PNG per top-level `plots:` entry.
`--json` prints the figures as one JSON object and writes nothing.

Not a DVC stage: it reads outputs of the whole pipeline and is the last step of a run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from newllm.core.errors import NewllmError
from newllm.core.headlines import Figure, Headline, headlines
from newllm.core.outputs import check_output

DVC_FILE = Path("dvc.yaml")
PARAMS_FILE = Path("params.yaml")
_REF = re.compile(r"(?<!\\)\$\{\s*([^}]+?)\s*\}")
_REPORT_FILES = re.compile(r"README\.md|[a-z0-9-]+\.png")  # what a report folder may hold
MISSING = "-"
WIDTH = 100  # columns of the printed report: a terminal's, not a wide screen's


# ---------------------------------------------------------------------------------------------
# dvc.yaml, resolved


@dataclass(frozen=True)
class Stage:
    """One resolved dvc.yaml stage (a matrix stage gives one per combination)."""

    name: str  # as `dvc repro` names it: train-converter@1-linear
    group: str  # the dvc.yaml key: train-converter
    metrics: tuple[str, ...]
    outs: tuple[str, ...]  # every output path, metrics and plots included


@dataclass(frozen=True)
class PlotSpec:
    """One top-level `plots:` entry: which columns of which files to draw."""

    title: str
    files: tuple[str, ...]
    x: dict[str, str | None]  # file -> x column (None: the row index, as DVC's `step`)
    y: dict[str, tuple[str, ...]]  # file -> y columns (empty: the last column)
    template: str = "linear"  # DVC's template name: bar_* draw bars, anything else lines


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    plots: tuple[PlotSpec, ...]


def _lookup(context: dict[str, Any], ref: str, where: str) -> Any:
    value: Any = context
    for part in re.split(r"\.|\[(\d+)\]", ref):
        if not part:
            continue
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise NewllmError(f"{where}: ${{{ref}}} is not defined in {PARAMS_FILE} "
                              "(or the stage's matrix/vars).")
    return value


def _as_text(value: Any, ref: str, where: str) -> str:
    # As DVC renders a value inside a longer string: booleans in lower case, no containers.
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        raise NewllmError(f"{where}: ${{{ref}}} is a {type(value).__name__} inside a string.")
    return str(value)


def interpolate(value: Any, context: dict[str, Any], where: str) -> Any:
    """`value` with every `${a.b}` replaced; a whole-string reference keeps its type."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            return _lookup(context, whole[1], where)
        return _REF.sub(lambda m: _as_text(_lookup(context, m[1], where), m[1], where), value)
    if isinstance(value, list):
        return [interpolate(v, context, where) for v in value]
    if isinstance(value, dict):
        return {interpolate(k, context, where): interpolate(v, context, where)
                for k, v in value.items()}
    return value


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise NewllmError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}).") from None


def _vars(entries: Any, root: Path, where: str) -> dict[str, Any]:
    """A dvc.yaml `vars` list: inline mappings and YAML files (`file.yaml` or `file.yaml:key`)."""
    merged: dict[str, Any] = {}
    for entry in entries or []:
        if isinstance(entry, dict):
            merged.update(entry)
            continue
        name, _, keys = str(entry).partition(":")
        data = _read_yaml(root / name) if (root / name).is_file() else None
        if not isinstance(data, dict):
            raise NewllmError(f"{where}: vars file '{name}' is missing or not a mapping.")
        merged.update({k: data[k] for k in keys.split(",") if k in data} if keys else data)
    return merged


def _paths(entries: Any) -> list[str]:
    """The paths of a deps/outs/metrics/plots list (`- path` or `- path: {options}`)."""
    found: list[str] = []
    for entry in entries or []:
        found += [str(entry)] if not isinstance(entry, dict) else [str(k) for k in entry]
    return found


def _instances(name: str, spec: dict[str, Any], context: dict[str, Any]
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(instance name, item context) of a stage: one, or one per matrix/foreach combination."""
    where = f"{DVC_FILE}: stage {name}"
    if "matrix" in spec:
        axes = {key: interpolate(values, context, where)
                for key, values in spec["matrix"].items()}
        for key, values in axes.items():
            if not isinstance(values, list):
                raise NewllmError(f"{where}: matrix.{key} must be a list, got {values!r}.")
        for combo in itertools.product(*axes.values()):
            # DVC names a combination with Python's str() of a boolean (train-lm@True-False)
            # though it renders one inside a string in lower case
            yield (f"{name}@" + "-".join(str(v) if isinstance(v, bool) else
                                         _as_text(v, name, where) for v in combo),
                   {"item": dict(zip(axes, combo, strict=True))})
    elif "foreach" in spec:
        items = interpolate(spec["foreach"], context, where)
        pairs = items.items() if isinstance(items, dict) else ((v, v) for v in items)
        for key, item in pairs:
            yield f"{name}@{_as_text(key, name, where)}", {"key": key, "item": item}
    else:
        yield name, {}


def load_pipeline(root: Path = Path(".")) -> Pipeline:
    """The stages and top-level plots of `root/dvc.yaml`, every `${...}` resolved."""
    dvc_file = root / DVC_FILE
    if not dvc_file.is_file():
        raise NewllmError(f"{dvc_file} does not exist; run `newllm report` from the project "
                          "root (the folder with dvc.yaml).")
    pipeline = _read_yaml(dvc_file)
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("stages", {}), dict):
        raise NewllmError(f"{dvc_file}: expected a mapping with a `stages` mapping.")
    params = _read_yaml(root / PARAMS_FILE) if (root / PARAMS_FILE).is_file() else {}
    context = {**(params or {}), **_vars(pipeline.get("vars"), root, str(dvc_file))}
    stages: list[Stage] = []
    for name, raw in pipeline.get("stages", {}).items():
        if not isinstance(raw, dict):
            raise NewllmError(f"{dvc_file}: stage {name} must be a mapping.")
        base = {**context, **_vars(raw.get("vars"), root, f"{dvc_file}: stage {name}")}
        for instance, item in _instances(name, raw, base):
            where = f"{dvc_file}: stage {instance}"
            body = raw.get("do", raw)
            # Only the paths: a `cmd` may use DVC's dict-to-flags rendering, which we never need.
            resolved = {key: interpolate(body.get(key), {**base, **item}, where)
                        for key in ("outs", "metrics", "plots")}
            metrics = _paths(resolved.get("metrics"))
            outs = _paths(resolved.get("outs")) + metrics + _paths(resolved.get("plots"))
            stages.append(Stage(instance, name, tuple(metrics), tuple(outs)))
    declared = [out for stage in stages for out in stage.outs]
    plots = [_plot_spec(entry, root, declared)
             for entry in interpolate(pipeline.get("plots") or [], context, str(dvc_file))]
    return Pipeline(tuple(stages), tuple(plots))


def _plot_spec(entry: Any, root: Path, declared: list[str]) -> PlotSpec:
    plot_id, config = (entry, {}) if not isinstance(entry, dict) else next(iter(entry.items()))
    config = config or {}
    y = config.get("y")
    title = str(config.get("title") or plot_id)
    if not config.get("title") and not isinstance(y, dict) and y:
        # The id is a path: say what is drawn, as the title.
        columns = ", ".join([y] if isinstance(y, str) else y)
        title += f": {columns}" + (f" vs {config['x']}" if isinstance(config.get("x"), str)
                                   else "")
    if isinstance(y, dict):  # {file: columns}: the id is only a name
        files = {str(f): tuple([c] if isinstance(c, str) else c or []) for f, c in y.items()}
    else:  # the id is the data: a file or a folder of files
        columns = tuple([y] if isinstance(y, str) else y or [])
        files = {str(plot_id): columns}
    expanded: dict[str, tuple[str, ...]] = {}
    for path, columns in files.items():
        folder = root / path
        # A folder: the files in it, and the stage outputs under it (a run not made yet must
        # not silently drop out of the plot).
        inside = [o for o in declared if Path(path) in Path(o).parents]
        if folder.is_dir():
            inside += [p.relative_to(root).as_posix() for p in folder.rglob("*")
                       if p.is_file() and not p.name.startswith(".")]
        for found in sorted(set(inside)) if inside or folder.is_dir() else [path]:
            expanded[found] = columns
    x = config.get("x")
    xs = {f: (x.get(f) if isinstance(x, dict) else x) for f in expanded}
    return PlotSpec(title, tuple(files), xs, expanded, str(config.get("template") or "linear"))


def producing_stage(pipeline: Pipeline, path: str) -> str:
    """The dvc.yaml stage (without @...) that writes `path` or files under it."""
    target = Path(path)
    for stage in pipeline.stages:
        for out in map(Path, stage.outs):
            if out == target or out in target.parents or target in out.parents:
                return stage.group
    return ""


def _run_hint(stage: str) -> str:
    return f"run `dvc repro {stage}`" if stage else "no dvc.yaml stage writes it"


# ---------------------------------------------------------------------------------------------
# Headline figures


@dataclass(frozen=True)
class Section:
    """A headline's figures as read: rows of (label -> value); one unnamed row if not per-row."""

    headline: Headline
    path: str
    columns: tuple[Figure, ...]
    rows: tuple[tuple[str, dict[str, Any]], ...]  # (row name, {key: value})


def _declared(headline: Headline) -> str:
    return headline.source or "newllm/<line>/headlines.py"


def metrics_files(pipeline: Pipeline, headline: Headline) -> list[str]:
    """The metrics file(s) a headline reads: its stage's one file (a foreach/matrix item named
    whole, `eval-ppl-cvfp@separate`, is one stage, its paths resolved for that item), or for
    a per-row headline on a matrix stage, each combination's one file (their keys merged)."""
    stages = [s for s in pipeline.stages if headline.stage in (s.group, s.name)]
    if not stages:
        raise NewllmError(f"{_declared(headline)}: '{headline.name}' names stage "
                          f"'{headline.stage}', which {DVC_FILE} does not have.")
    paths = sorted({m for s in stages for m in s.metrics})
    per_combination = (headline.rows is not None and len(stages) > 1
                       and all(len(s.metrics) == 1 for s in stages))
    if len(paths) != 1 and not per_combination:
        raise NewllmError(f"{_declared(headline)}: '{headline.name}' needs a stage with one "
                          f"metrics file; {headline.stage} has {len(paths)} ({', '.join(paths)}).")
    return paths


def _read_metrics(root: Path, path: str, hint: str) -> dict[str, Any]:
    try:
        metrics = json.loads((root / path).read_text())
    except FileNotFoundError:
        raise NewllmError(f"{path} does not exist; {hint}.") from None
    except (OSError, ValueError) as exc:
        raise NewllmError(f"{path} is not a readable JSON file ({exc}); {hint}.") from None
    if not isinstance(metrics, dict):
        raise NewllmError(f"{path} is not a JSON object of metrics; {hint}.")
    return metrics


def read_section(pipeline: Pipeline, headline: Headline, root: Path = Path(".")) -> Section:
    """The headline's figures from its stage's metrics file(s); NewllmError if absent or
    stale."""
    paths = metrics_files(pipeline, headline)
    path = ", ".join(paths)
    hint = _run_hint(headline.stage)
    metrics: dict[str, Any] = {}
    for one in paths:
        for key, value in _read_metrics(root, one, hint).items():
            if key in metrics:
                raise NewllmError(f"{one} repeats '{key}' of another {headline.stage} metrics "
                                  f"file; each combination must write its own keys.")
            metrics[key] = value
    if headline.rows is None:
        by_row = {"": metrics}
    else:
        pattern = re.compile(headline.rows)
        by_row = {}
        for key, value in metrics.items():
            match = pattern.match(key)
            if match:
                by_row.setdefault(match[1], {})[key[match.end():]] = value
        if not by_row:
            raise NewllmError(f"{path} has no keys like '{headline.rows}' "
                              f"({headline.name} rows); {hint}.")
    wanted = {f.key for f in headline.figures}
    picked = {row: {k: v for k, v in kv.items() if k in wanted} for row, kv in by_row.items()}
    # Numbered rows (layers) in numeric order, then any others by name; rows with no
    # headline figure (only other statistics) are left out.
    rows = sorted(((row, kv) for row, kv in picked.items() if kv or headline.rows is None),
                  key=lambda rk: (0, int(rk[0]), "") if rk[0].isdigit() else (1, 0, rk[0]))
    present = {k for _, kv in rows for k in kv}
    for figure in headline.figures:
        if figure.key not in present:
            raise NewllmError(f"{path} has no '{figure.key}' ({headline.title}); it is stale, "
                              f"{hint}.")
        for _, kv in rows:
            if figure.key in kv:
                formatted(figure, kv[figure.key], path)  # a value of the wrong type stops here
    columns = tuple(f for f in headline.figures if f.key in present)
    return Section(headline, path, columns, tuple(rows))


def formatted(figure: Figure, value: Any, path: str = "") -> str:
    """`value` printed with the figure's format spec."""
    if figure.fmt and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise NewllmError(f"{path}: '{figure.key}' is {value!r}, expected a number.")
    try:
        return format(value, figure.fmt)
    except (TypeError, ValueError):
        raise NewllmError(f"{path}: '{figure.key}' is {value!r}, which does not print as "
                          f"'{figure.fmt}' (newllm/<line>/headlines.py).") from None


def section_json(section: Section) -> dict[str, Any]:
    """A section for `--json`: {key: value}, or {row: {key: value}} for a per-row table."""
    figures: Any = ({row: values for row, values in section.rows} if section.headline.rows
                    else section.rows[0][1])
    return {"title": section.headline.title, "stage": section.headline.stage,
            "metrics": section.path, "figures": figures}


def _table(section: Section) -> tuple[list[str], list[list[str]]]:
    """Header and cells: a label/value table, or a row per row with a column per figure."""
    if section.headline.rows is None:
        values = section.rows[0][1]
        return (["figure", "value"],
                [[f.label, formatted(f, values[f.key], section.path)] for f in section.columns])
    header = [section.headline.row_label] + [f.label for f in section.columns]
    cells = [[row] + [formatted(f, values[f.key], section.path) if f.key in values else MISSING
                      for f in section.columns]
             for row, values in section.rows]
    return header, cells


def _sources(section: Section) -> str:
    """Where a section's figures come from, short: a matrix stage's files by their folder."""
    paths = section.path.split(", ")
    parents = {str(Path(p).parent) for p in paths}
    where = (f"{len(paths)} files in {parents.pop()}/" if len(paths) > 1 and len(parents) == 1
             else section.path)
    return f"({section.headline.stage}: {where})"


def _column_groups(widths: list[int], width: int = WIDTH) -> list[list[int]]:
    """Column indexes (after the row-name column 0) in groups that each fit `width` with
    column 0 repeated in front; a column wider than that on its own gets a group alone."""
    groups: list[list[int]] = [[]]
    used = 2 + widths[0]
    for i in range(1, len(widths)):
        if groups[-1] and used + 2 + widths[i] > width:
            groups.append([])
            used = 2 + widths[0]
        groups[-1].append(i)
        used += 2 + widths[i]
    return groups


def terminal_text(sections: list[Section]) -> str:
    """The sections as text at most `WIDTH` columns wide (but for a single word longer than
    that): titles and long values wrapped, a per-row table too wide for one block printed as
    several narrower ones, the row names repeated in each (a row only where it has a figure)."""
    blocks = []
    for section in sections:
        header, cells = _table(section)
        lines = textwrap.wrap(section.headline.title, WIDTH)
        lines += textwrap.wrap(_sources(section), WIDTH, initial_indent="  ",
                               subsequent_indent="    ", break_on_hyphens=False)
        if section.headline.rows is None:
            width = max(len(row[0]) for row in cells)
            room = max(WIDTH - 4 - width, 20)
            for label, value in cells:
                parts = textwrap.wrap(value, room, break_on_hyphens=False) or [value]
                lines.append(f"  {label.ljust(width)}  {parts[0]}")
                lines += [" " * (4 + width) + part for part in parts[1:]]
        else:
            widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
            for n, group in enumerate(_column_groups(widths)):
                # A row with no figure among these columns is left out of this block.
                shown = [r for r in cells if any(r[i] != MISSING for i in group)]
                lines += [""] if n else []
                lines += ["  " + "  ".join(r[i].rjust(widths[i]) for i in [0, *group])
                          for r in [header, *shown]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _md(text: str) -> str:
    # Table cells: a literal | ends the cell and <...> reads as HTML (e.g. <|endoftext|>).
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown_text(sections: list[Section], plots: list[tuple[PlotSpec, str]]) -> str:
    lines = ["# Report", "",
             "Written by `newllm report` from the metrics and plots that `dvc.yaml` declares; "
             "rerun it after `dvc repro` rather than editing this file.", ""]
    for section in sections:
        header, cells = _table(section)
        # Per-row tables are numbers (right-aligned); a label/value table reads left to right.
        align = ["---:" if section.headline.rows else "---"] * len(header)
        lines += [f"## {section.headline.title}", "",
                  f"Stage `{section.headline.stage}`, `{section.path}`.", "",
                  "| " + " | ".join(_md(h) for h in header) + " |",
                  "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in cells]
        lines += ["", section.headline.note, ""] if section.headline.note else [""]
    if plots:
        lines += ["## Plots", ""]
        for spec, png in plots:
            lines += [f"### {spec.title}", "", f"![{spec.title}]({png})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def _read_table(path: str, root: Path, stage: str) -> list[dict[str, Any]]:
    """Records of a CSV/TSV file or a JSON list of objects."""
    file = root / path
    if not file.is_file():
        raise NewllmError(f"{path} does not exist; {_run_hint(stage)}.")
    try:
        text = file.read_bytes().decode("utf-8")
        data = json.loads(text) if file.suffix == ".json" else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = "UTF-8" if isinstance(exc, UnicodeDecodeError) else "JSON"
        raise NewllmError(f"{path}: not valid {what}; {_run_hint(stage)}.") from None
    if file.suffix == ".json":
        if isinstance(data, dict) and len(data) == 1:
            data = next(iter(data.values()))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise NewllmError(f"{path}: expected a JSON list of records to plot.")
        return data
    if file.suffix not in (".csv", ".tsv"):
        raise NewllmError(f"{path}: cannot plot a '{file.suffix}' file (csv, tsv or json).")
    return list(csv.DictReader(io.StringIO(text), delimiter="\t" if file.suffix == ".tsv"
                               else ","))


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value  # a category (drawn in order of appearance)


@dataclass(frozen=True)
class Series:
    """One drawn line (or set of bars): a y column of a file, or one group of its rows."""

    file: str
    column: str
    xs: list[Any]
    ys: list[Any]
    group: str = ""  # "block 1": the rows of one group where the x values restart


def _groups(records: list[dict[str, Any]], xs: list[Any], used: set[str]
            ) -> list[tuple[str, slice]]:
    """The rows as groups: a new one wherever a numeric x fails to increase (phase 1's
    iteration restarting at each block), named by the column that is constant within each
    group and differs between them (`block 1`); one unnamed group if x never restarts."""
    if len(xs) < 4 or not all(isinstance(x, float) for x in xs):
        return [("", slice(None))]
    starts = [0] + [i for i in range(1, len(xs)) if xs[i] <= xs[i - 1]] + [len(xs)]
    spans = [slice(a, b) for a, b in itertools.pairwise(starts)]
    if len(spans) == 1 or any(span.stop - span.start < 2 for span in spans):
        return [("", slice(None))]
    for column in [c for c in records[0] if c not in used]:
        values = [{str(r[column]) for r in records[span]} for span in spans]
        if all(len(v) == 1 for v in values) and len({v.pop() for v in values}) == len(spans):
            return [(f"{column} {records[span.start][column]}", span) for span in spans]
    return [(f"part {n}", span) for n, span in enumerate(spans, 1)]


def plot_data(pipeline: Pipeline, spec: PlotSpec, root: Path = Path(".")) -> list[Series]:
    """Every series of a plot: per file, per y column, per group of rows (see `_groups`)."""
    if not spec.y:
        stage = producing_stage(pipeline, spec.files[0]) if spec.files else ""
        raise NewllmError(f"plot '{spec.title}': {', '.join(spec.files)} holds no data; "
                          f"{_run_hint(stage)}.")
    series = []
    for path, columns in spec.y.items():
        records = _read_table(path, root, producing_stage(pipeline, path))
        if not records:
            raise NewllmError(f"{path} has no rows to plot; "
                              f"{_run_hint(producing_stage(pipeline, path))}.")
        fields = list(records[0])
        x_column = spec.x.get(path)
        for column in [c for c in [x_column, *columns] if c]:
            if column not in fields:
                raise NewllmError(f"{path} has no column '{column}' (plot '{spec.title}' in "
                                  f"{DVC_FILE}); it has {', '.join(fields)}.")
        xs = ([_number(r[x_column]) for r in records] if x_column
              else list(range(len(records))))
        drawn = list(columns or fields[-1:])  # DVC's default y is the last column
        groups = (_groups(records, xs, {x_column or "", *drawn})
                  if not spec.template.startswith("bar") else [("", slice(None))])
        for column in drawn:
            ys = [_number(r[column]) for r in records]
            series += [Series(path, column, xs[span], ys[span], group)
                       for group, span in groups]
    return series


def _title(text: str) -> str:
    # About 64 characters fit the width of the figure at the title's size: wrap, never clip.
    return textwrap.fill(text, 64, break_on_hyphens=False)


def _draw_bars(axes: Any, spec: PlotSpec, series: list[Series]) -> None:
    """DVC's bar templates: bar_horizontal* has the value on x and the category on y."""
    horizontal = spec.template.startswith("bar_horizontal")
    pairs = [(s, list(zip(s.ys, s.xs, strict=True)) if horizontal
              else list(zip(s.xs, s.ys, strict=True))) for s in series]
    categories = list(dict.fromkeys(str(c) for _, cv in pairs for c, _ in cv))
    shared = sum(len(cv) for _, cv in pairs) > len(categories)  # several series per category
    files = list(dict.fromkeys(s.file for s in series))
    columns = list(dict.fromkeys(s.column for s in series))
    size = 0.8 / len(pairs) if shared else 0.8
    for n, (one, cv) in enumerate(pairs):
        at = [categories.index(str(c)) + ((n - (len(pairs) - 1) / 2) * size if shared else 0)
              for c, _ in cv]
        values = [v for _, v in cv]
        name = " ".join(([Path(one.file).stem] if len(files) > 1 else [])
                        + ([one.column] if len(columns) > 1 else []))
        draw = axes.barh if horizontal else axes.bar
        bars = draw(at, values, size, color=f"C{n % 10 if shared else 0}",
                    label=name if shared else None)
        axes.bar_label(bars, fmt="%.4g", fontsize=7, padding=2)
    ticks, labels = range(len(categories)), categories
    if horizontal:
        axes.set_yticks(ticks, labels)
        axes.invert_yaxis()  # the first row on top, as the file reads
        axes.margins(x=0.12)  # room for the value labels
    else:
        axes.set_xticks(ticks, labels, rotation=30, ha="right")
        axes.margins(y=0.12)
    value_name = spec.x.get(series[0].file) if horizontal else series[0].column
    axes.set_xlabel(value_name or "value") if horizontal else axes.set_ylabel(value_name)
    axes.set_ylabel(series[0].column) if horizontal else axes.set_xlabel(
        spec.x.get(series[0].file) or "step")
    axes.grid(alpha=0.3, axis="x" if horizontal else "y")
    if shared:
        axes.legend(fontsize=7)


def plot_png(spec: PlotSpec, series: list[Series]) -> bytes:
    """One PNG, byte-identical for the same data (no Software/date metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    files = list(dict.fromkeys(s.file for s in series))
    columns = list(dict.fromkeys(s.column for s in series))
    # A colour per file and group when there are several (runs, blocks), a line style per
    # column among them; else a colour per column.
    owners = list(dict.fromkeys((s.file, s.group) for s in series))
    many = len(owners) > 1
    styles = ["-", "--", ":", "-."]
    outside = not spec.template.startswith("bar") and len(series) > 4  # legend beside the axes
    defaults = {k: v for k, v in matplotlib.rcParamsDefault.items() if k != "backend"}
    with matplotlib.rc_context(defaults):  # the same look whatever the user's matplotlibrc
        figure = MplFigure(figsize=(9.0 if outside else 7.5, 4.5), dpi=100, layout="constrained")
        axes = figure.subplots()
        axes.set_title(_title(spec.title), fontsize=11)
        if spec.template.startswith("bar"):
            _draw_bars(axes, spec, series)
        else:
            for one in series:
                name = [Path(one.file).stem] if len(files) > 1 else []
                name += [one.group] if one.group else []
                name += [one.column] if len(columns) > 1 or not name else []
                colour = owners.index((one.file, one.group)) if many else columns.index(one.column)
                axes.plot(one.xs, one.ys, marker="o" if len(one.xs) < 12 else None, markersize=3,
                          color=f"C{colour % 10}",
                          linestyle=styles[columns.index(one.column) % len(styles)] if many
                          else "-", label=" ".join(name))
            x_names = {spec.x.get(p) or "step" for p in files}
            axes.set_xlabel(x_names.pop() if len(x_names) == 1 else "x")
            axes.set_ylabel(columns[0] if len(columns) == 1 else "value")
            axes.grid(alpha=0.3)
            if outside:
                figure.legend(loc="outside right upper", fontsize=7)
            elif len(series) > 1:  # one line: its name is the y label already
                axes.legend(fontsize=7)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def png_name(title: str, taken: set[str]) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "plot"
    name, n = f"{stem}.png", 2
    while name in taken:
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name)
    return name


def _check_out(out: Path) -> None:
    # The folder is replaced whole: refuse one holding anything a report did not write (the
    # stages' own output guard, with a report folder's names).
    check_output(out, "dir", "--out", only=_REPORT_FILES, writer="newllm report")


@click.command("report")
@click.option("--out", default="report", show_default=True, type=click.Path(),
              help="Folder to write README.md and the plots' PNGs to (replaced whole).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the headline figures as one JSON object; write nothing.")
def report(out: str, as_json: bool) -> None:
    """Print the headline figures of every line of research; write them with the plots.

    Figures come from the metrics files of the dvc.yaml stages that
    each line's newllm/<line>/headlines.py names; plots are dvc.yaml's top-level `plots`.
    """
    pipeline = load_pipeline()
    sections = [read_section(pipeline, headline) for headline in headlines()]
    if as_json:
        click.echo(json.dumps({s.headline.name: section_json(s) for s in sections}, indent=2))
        return
    out_dir = Path(out)
    _check_out(out_dir)
    # Everything is read and drawn before the folder is touched: an error writes nothing.
    taken: set[str] = set()
    pngs = [(spec, png_name(spec.title, taken), plot_png(spec, plot_data(pipeline, spec)))
            for spec in pipeline.plots]
    readme = markdown_text(sections, [(spec, name) for spec, name, _ in pngs])
    from newllm.core.artifacts import atomic_dir  # imports torch; the --json path stays light

    with atomic_dir(out_dir) as tmp:
        (tmp / "README.md").write_text(readme)
        for _, name, data in pngs:
            (tmp / name).write_bytes(data)
    click.echo(terminal_text(sections))
    click.echo(f"\nwrote {out_dir / 'README.md'} and {len(pngs)} plot(s):")
    click.echo(textwrap.fill(", ".join(name for _, name, _ in pngs), WIDTH, initial_indent="  ",
                             subsequent_indent="  ", break_on_hyphens=False,
                             break_long_words=False))
