"""`newllm report`: the headline figures of every line of research, and the plots.

Reads the metrics files and plot data that `dvc.yaml` declares (with `${...}`
resolved against params.yaml and `matrix`/`foreach` stages expanded by a small
resolver here: DVC's own index costs about a second to load), prints one table
per `newllm.core.headlines.HEADLINES` entry, and writes `<out>/README.md` (the same
tables in Markdown, plots embedded) with one PNG per top-level `plots:` entry.
`--json` prints the figures as one JSON object and writes nothing.

Not a DVC stage: it reads outputs of the whole pipeline and is the last step of a run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from newllm.core.errors import NewllmError
from newllm.core.headlines import HEADLINES, Figure, Headline

DVC_FILE = Path("dvc.yaml")
PARAMS_FILE = Path("params.yaml")
_REF = re.compile(r"(?<!\\)\$\{\s*([^}]+?)\s*\}")
_REPORT_FILES = re.compile(r"README\.md|[a-z0-9-]+\.png")  # what a report folder may hold
MISSING = "-"


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
    return PlotSpec(title, tuple(files), xs, expanded)


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


def metrics_files(pipeline: Pipeline, headline: Headline) -> list[str]:
    """The metrics file(s) a headline reads: its stage's one file, or for a per-row headline
    on a matrix stage, each combination's one file (their keys merged into one table)."""
    stages = [s for s in pipeline.stages if headline.stage in (s.group, s.name)]
    if not stages:
        raise NewllmError(f"newllm/headlines.py: '{headline.name}' names stage "
                          f"'{headline.stage}', which {DVC_FILE} does not have.")
    paths = sorted({m for s in stages for m in s.metrics})
    per_combination = (headline.rows is not None and len(stages) > 1
                       and all(len(s.metrics) == 1 for s in stages))
    if len(paths) != 1 and not per_combination:
        raise NewllmError(f"newllm/headlines.py: '{headline.name}' needs a stage with one metrics "
                          f"file; {headline.stage} has {len(paths)} ({', '.join(paths)}).")
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
                          f"'{figure.fmt}' (newllm/headlines.py).") from None


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


def terminal_text(sections: list[Section]) -> str:
    blocks = []
    for section in sections:
        header, cells = _table(section)
        lines = [f"{section.headline.title}  ({section.headline.stage}: {section.path})"]
        if section.headline.rows is None:
            width = max(len(row[0]) for row in cells)
            lines += [f"  {label.ljust(width)}  {value}" for label, value in cells]
        else:
            widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
            lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                      for r in [header, *cells]]
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


def plot_data(pipeline: Pipeline, spec: PlotSpec, root: Path = Path(".")
              ) -> list[tuple[str, str, list[Any], list[Any]]]:
    """(file, y column, x values, y values) of every line of a plot."""
    if not spec.y:
        stage = producing_stage(pipeline, spec.files[0]) if spec.files else ""
        raise NewllmError(f"plot '{spec.title}': {', '.join(spec.files)} holds no data; "
                          f"{_run_hint(stage)}.")
    lines = []
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
        for column in columns or fields[-1:]:  # DVC's default y is the last column
            lines.append((path, column, xs, [_number(r[column]) for r in records]))
    return lines


def plot_png(spec: PlotSpec, lines: list[tuple[str, str, list[Any], list[Any]]]) -> bytes:
    """One PNG, byte-identical for the same data (no Software/date metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    files = list(dict.fromkeys(line[0] for line in lines))
    columns = list(dict.fromkeys(line[1] for line in lines))
    styles = ["-", "--", ":", "-."]
    defaults = {k: v for k, v in matplotlib.rcParamsDefault.items() if k != "backend"}
    with matplotlib.rc_context(defaults):  # the same look whatever the user's matplotlibrc
        figure = MplFigure(figsize=(7.5, 4.5), dpi=100)
        axes = figure.subplots()
        for path, column, xs, ys in lines:
            # One file: a colour per column. Several (a folder of runs): a colour per file
            # and a line style per column, so the runs stay readable.
            many = len(files) > 1
            name = [Path(path).stem] if many else []
            name += [column] if len(columns) > 1 or not name else []
            colour = files.index(path) if many else columns.index(column)
            axes.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3,
                      color=f"C{colour % 10}",
                      linestyle=styles[columns.index(column) % len(styles)] if many else "-",
                      label=" ".join(name))
        x_names = {spec.x.get(p) or "step" for p in files}
        axes.set_xlabel(x_names.pop() if len(x_names) == 1 else "x")
        axes.set_ylabel(columns[0] if len(columns) == 1 else "value")
        axes.set_title(spec.title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
        figure.tight_layout()
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
    # The folder is replaced whole: refuse one holding anything a report did not write.
    if out.exists() and not out.is_dir():
        raise NewllmError(f"--out {out} is a file; expected a folder for the report.")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _REPORT_FILES.fullmatch(p.name))
        if foreign:
            raise NewllmError(f"--out {out} holds files newllm report did not write "
                              f"({', '.join(foreign[:3])}); choose an empty or report folder.")


@click.command("report")
@click.option("--out", default="report", show_default=True, type=click.Path(),
              help="Folder to write README.md and the plots' PNGs to (replaced whole).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the headline figures as one JSON object; write nothing.")
def report(out: str, as_json: bool) -> None:
    """Print the headline figures of every line of research; write them with the plots.

    Figures come from the metrics files of the dvc.yaml stages that
    newllm/headlines.py names; plots are dvc.yaml's top-level `plots`.
    """
    pipeline = load_pipeline()
    sections = [read_section(pipeline, headline) for headline in HEADLINES]
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
    click.echo(f"\nwrote {out_dir / 'README.md'} and {len(pngs)} plot(s): "
               + ", ".join(name for _, name, _ in pngs))
