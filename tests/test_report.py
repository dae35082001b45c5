"""`newllm report` on a synthetic project whose metrics are random numbers drawn per test.

The project's dvc.yaml gives every section that a line declares (newllm/<line>/headlines.py)
its stage (metrics paths through `${...}` in params.yaml; a foreach stage for a headline that
names one item) and declares three plots (a file with a y mapping, a folder of runs written by
a matrix stage, and bars), so each declared figure and plot is checked, including sections
added later. The report of the committed metrics must fit a terminal (`WIDTH` columns).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, assert_one_line_error

from newllm.core.errors import NewllmError
from newllm.core.headlines import Figure, Headline, headlines
from newllm.core.report import (
    MISSING,
    WIDTH,
    PlotSpec,
    load_pipeline,
    metrics_files,
    plot_data,
    plot_png,
    read_section,
    terminal_text,
)

HEADLINES = headlines()
REPORT_ORDER = ["perplexity", "reversal_knowledge", "reversal_curse", "converter",
                "virtual_tokens", "virtual_token_capacity", "chameleon", "cvfp",
                "cvfp_perplexity", "cvfp_grid", "infini", "infini_passkey", "infini_reversal"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def value_for(figure: Figure, rng: random.Random) -> Any:
    """A random value of the kind the figure's format spec prints."""
    if figure.fmt.endswith("d"):
        return rng.randrange(1, 10**6)
    if figure.fmt:
        return rng.uniform(0.001, 1000.0)
    return f"v{rng.randrange(10**9)}"


def row_key(pattern: str, row: str) -> str:
    """A metrics-key prefix that `pattern` reads as `row` (its first group replaced)."""
    prefix = re.sub(r"\\(.)", r"\1", re.sub(r"\((?!\?).*?\)", row, pattern, count=1))
    match = re.match(pattern, prefix)
    assert match and match[1] == row, f"cannot build a key for rows '{pattern}'"
    return prefix


def synthetic_metrics(headline: Headline, rng: random.Random
                      ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(metrics file content, {row: {key: value}}); row '' for a label/value section."""
    figures = headline.figures
    if headline.rows is None:
        values = {f.key: value_for(f, rng) for f in figures}
        return {**values, "unrelated_key": rng.random()}, {"": values}
    group = re.search(r"\((?!\?)(.*?)\)", headline.rows)[1]
    if re.fullmatch(r"[a-z_]+(\|[a-z_]+)+", group):  # (cvfp|zeros|...): rows by name
        names = rng.sample(group.split("|"), min(3, group.count("|") + 1))
    else:  # (\d+), (k\d+): a literal prefix and a number
        literal = re.match(r"[A-Za-z_]*", group)[0]
        names = [f"{literal}{n}" for n in rng.sample(range(1, 40), 3)]
    rows = {name: {f.key: value_for(f, rng) for f in figures} for name in names}
    content = {row_key(headline.rows, r) + k: v for r, kv in rows.items() for k, v in kv.items()}
    return content, rows


def make_project(root: Path, rng: random.Random) -> dict[str, dict[str, dict[str, Any]]]:
    """dvc.yaml, params.yaml, metrics and plot data; returns {headline name: rows}."""
    stages: dict[str, Any] = {}
    params: dict[str, Any] = {"paths": {}, "runs": ["a", "b", "c"]}
    expected = {}
    written: dict[str, Path] = {}  # stage -> its metrics file (headlines may share a stage)
    for headline in HEADLINES:
        content, expected[headline.name] = synthetic_metrics(headline, rng)
        if headline.stage in written:  # another section of the same stage's metrics file
            shared = written[headline.stage]
            shared.write_text(json.dumps({**json.loads(shared.read_text()), **content}))
            continue
        path = f"metrics/{headline.name}.json"
        params["paths"][headline.name] = path
        written[headline.stage] = root / path
        group, _, item = headline.stage.partition("@")
        if item:  # one item of a foreach stage: its own file, the other item's is never read
            stages.setdefault(group, {"foreach": {"unread": {"metrics": "metrics/unread.json"}},
                                      "do": {"cmd": "true", "metrics": [
                                          {"${item.metrics}": {"cache": False}}]}})
            stages[group]["foreach"][item] = {"metrics": f"${{paths.{headline.name}}}"}
        else:
            stages[headline.stage] = {"cmd": "true", "metrics": [
                {f"${{paths.{headline.name}}}": {"cache": False}}]}
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(content))
    stages["test-runs"] = {"matrix": {"run": "${runs}"}, "cmd": "true",
                           "outs": [{"plots/runs/${item.run}.csv": {"cache": False}}]}
    stages["test-summary"] = {"cmd": "true", "outs": [{"plots/summary.csv": {"cache": False}},
                                                       {"plots/variants.csv": {"cache": False}}]}
    pipeline = {"stages": stages, "plots": [
        {"Score vs step": {"x": "step", "y": {"plots/summary.csv": ["score", "other"]}}},
        {"plots/runs": {"x": "epoch", "y": ["train_loss", "val_loss"]}},
        {"Score per variant": {"template": "bar_horizontal", "x": "score",
                               "y": {"plots/variants.csv": "variant"}}},
    ]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "plots" / "runs").mkdir(parents=True)
    (root / "plots" / "summary.csv").write_text(
        "step,score,other\n" + "".join(f"{i},{rng.random()},{rng.random()}\n" for i in range(5)))
    (root / "plots" / "variants.csv").write_text(
        "variant,score\n" + "".join(f"v{i},{rng.random()}\n" for i in range(4)))
    for run in params["runs"]:
        (root / "plots" / "runs" / f"{run}.csv").write_text("epoch,train_loss,val_loss\n" + "".join(
            f"{e},{rng.random()},{rng.random()}\n" for e in range(1, 4)))
    return expected


def figure_of(headline: Headline, key: str) -> Figure:
    return next(f for f in headline.figures if f.key == key)


def printed_rows(block: list[str]) -> tuple[list[list[str]], dict[str, dict[str, str]]]:
    """A per-row section's text, read back: (each of its tables' row names in order,
    {row: {column label: cell}}). The table may be split into several (blank-line separated),
    each with the row-name column first; cells and labels are apart by two spaces or more."""
    orders: list[list[str]] = []
    cells: dict[str, dict[str, str]] = {}
    for table in "\n".join(block).split("\n\n"):
        header, *rows = [re.split(r" {2,}", line.strip()) for line in table.splitlines()]
        orders.append([row[0] for row in rows])
        for row in rows:
            assert len(row) == len(header), (row, header)
            assert any(cell != MISSING for cell in row[1:]), (row, header)  # else left out
            cells.setdefault(row[0], {}).update(zip(header[1:], row[1:], strict=True))
    return orders, cells


def assert_printed(out: str, expected: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Every headline figure is printed: `label  value` on its line, or in a per-row table
    (maybe split in several) the row's cell under the figure's label, MISSING where the row
    has no such figure; a row is left out only of a table where it has none."""
    lines = out.splitlines()
    for headline in HEADLINES:
        title = textwrap.wrap(headline.title, WIDTH)
        start = next(i for i, line in enumerate(lines) if line == title[0]) + len(title)
        # The section: its indented lines (the first names stage and metrics) up to the next
        # title, or the end.
        end = next((i for i in range(start, len(lines)) if lines[i][:1] not in ("", " ")),
                   len(lines))
        while end > start and not lines[end - 1].strip():
            end -= 1
        assert lines[start].startswith(f"  ({headline.stage}: "), lines[start]
        block = lines[start + 1:end]
        rows = expected[headline.name]
        if headline.rows is None:
            for key, value in rows[""].items():
                figure = figure_of(headline, key)
                text = format(value, figure.fmt)
                assert any(re.fullmatch(rf"  {re.escape(figure.label)} +{re.escape(text)}",
                                        line) for line in block), (figure, text, block)
            continue
        orders, cells = printed_rows(block)
        columns = [f for f in headline.figures if any(f.key in v for v in rows.values())]
        for row, values in rows.items():
            assert row in cells, (row, block)
            for f in columns:
                text = format(values[f.key], f.fmt) if f.key in values else MISSING
                assert cells[row].get(f.label, MISSING) == text, (row, f, block)
        # numbered rows in numeric order, then named ones, in each table
        rank = {r: n for n, r in enumerate(sorted(rows, key=lambda r: (
            (0, int(r), "") if r.isdigit() else (1, 0, r))))}
        assert all(order == sorted(order, key=rank.__getitem__) for order in orders), orders


def test_report_prints_every_headline_figure(tmp_path, run_cli):
    expected = make_project(tmp_path, random.Random())
    result = run_cli("report", cwd=tmp_path)
    assert result.code == 0, result.err
    assert_printed(result.out, expected)
    assert max(map(len, result.out.splitlines())) <= WIDTH
    readme = (tmp_path / "report" / "README.md").read_text()
    for headline in HEADLINES:
        assert f"## {headline.title}" in readme
        for row, values in expected[headline.name].items():
            texts = [format(values[f.key], f.fmt) for f in headline.figures]
            if headline.rows is None:
                lines = [f"| {f.label} | {t} |" for f, t in zip(headline.figures, texts,
                                                                strict=True)]
            else:
                lines = ["| " + " | ".join([row, *texts]) + " |"]
            for line in lines:
                assert line + "\n" in readme, line


def test_report_writes_one_deterministic_png_per_plot(tmp_path, run_cli):
    import matplotlib.image

    make_project(tmp_path, random.Random())
    assert run_cli("report", "--out", "out", cwd=tmp_path).code == 0
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 3  # the three top-level plots of the synthetic dvc.yaml
    readme = (tmp_path / "out" / "README.md").read_text()
    first = {}
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert b"Software" not in data and b"Creation" not in data
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({png.name})" in readme
        first[png.name] = data
    # Rerunning on the same data gives the same bytes (no dates, same fonts and layout).
    assert run_cli("report", "--out", "out", cwd=tmp_path).code == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")} == first


def test_missing_metrics_file_names_the_stage_and_writes_nothing(tmp_path, run_cli):
    make_project(tmp_path, random.Random())
    headline = HEADLINES[0]
    (tmp_path / "metrics" / f"{headline.name}.json").unlink()
    result = run_cli("report", cwd=tmp_path)
    assert result.code == 2
    assert_one_line_error(result, f"metrics/{headline.name}.json does not exist",
                          f"run `dvc repro {headline.stage}`")
    assert not (tmp_path / "report").exists()
    assert result.out == ""
    assert run_cli("report", "--json", cwd=tmp_path).code == 2


def test_an_earlier_report_survives_a_failed_one(tmp_path, run_cli):
    make_project(tmp_path, random.Random())
    assert run_cli("report", cwd=tmp_path).code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    (tmp_path / "plots" / "runs" / "b.csv").unlink()
    result = run_cli("report", cwd=tmp_path)
    assert_one_line_error(result, "plots/runs/b.csv does not exist", "dvc repro test-runs")
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before


def test_a_plot_file_that_is_not_utf8_is_one_line(tmp_path, run_cli):
    make_project(tmp_path, random.Random())
    (tmp_path / "plots" / "runs" / "b.csv").write_bytes(b"epoch,train_loss,val_loss\n1,\xff,2\n")
    result = run_cli("report", cwd=tmp_path)
    assert_one_line_error(result, "plots/runs/b.csv: not valid UTF-8", "dvc repro test-runs")
    assert not (tmp_path / "report").exists()


def test_stale_metrics_without_a_headline_key(tmp_path, run_cli):
    make_project(tmp_path, random.Random())
    headline = HEADLINES[0]
    figure = headline.figures[0]
    path = tmp_path / "metrics" / f"{headline.name}.json"
    metrics = {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith(figure.key)}
    path.write_text(json.dumps(metrics))
    assert_one_line_error(run_cli("report", cwd=tmp_path), f"no '{figure.key}'",
                          f"dvc repro {headline.stage}")


def test_a_figure_that_is_not_a_number(tmp_path, run_cli):
    make_project(tmp_path, random.Random())
    headline, figure = next((h, f) for h in HEADLINES for f in h.figures if f.fmt)
    path = tmp_path / "metrics" / f"{headline.name}.json"
    metrics = {k: ("n/a" if k.endswith(figure.key) else v)
               for k, v in json.loads(path.read_text()).items()}
    path.write_text(json.dumps(metrics))
    assert_one_line_error(run_cli("report", cwd=tmp_path), f"'{figure.key}' is 'n/a'",
                          "expected a number")
    assert not (tmp_path / "report").exists()


def test_json_carries_the_printed_figures(tmp_path, run_cli):
    expected = make_project(tmp_path, random.Random())
    result = run_cli("report", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    assert not (tmp_path / "report").exists()  # --json writes nothing
    report = json.loads(result.out)
    assert list(report) == [h.name for h in HEADLINES]
    for headline in HEADLINES:
        section = report[headline.name]
        assert section["stage"] == headline.stage
        first = next(h for h in HEADLINES if h.stage == headline.stage)  # shared file
        assert section["metrics"] == f"metrics/{first.name}.json"
        rows = expected[headline.name]
        assert section["figures"] == (rows[""] if headline.rows is None else rows)
    # ...and they are what the table prints.
    table = run_cli("report", cwd=tmp_path)
    assert_printed(table.out, {h.name: ({"": report[h.name]["figures"]} if h.rows is None
                                        else report[h.name]["figures"]) for h in HEADLINES})


def test_refuses_an_out_folder_it_did_not_write(tmp_path, run_cli):
    make_project(tmp_path, random.Random())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert_one_line_error(run_cli("report", "--out", "notes", cwd=tmp_path), "mine.txt")
    assert_one_line_error(run_cli("report", "--out", ".", cwd=tmp_path), "dvc.yaml")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_outside_a_project(tmp_path, run_cli):
    assert_one_line_error(run_cli("report", cwd=tmp_path), "dvc.yaml does not exist")


def test_every_headline_names_a_real_stage_with_one_metrics_file():
    pipeline = load_pipeline(REPO)
    for headline in HEADLINES:
        paths = metrics_files(pipeline, headline)
        assert paths and all(path.endswith(".json") for path in paths)
        # several files only for a per-row table over a matrix stage's combinations
        assert len(paths) == 1 or headline.rows is not None
    assert len({h.name for h in HEADLINES}) == len(HEADLINES)


def test_resolver_agrees_with_dvc_on_the_real_pipeline():
    dvc_repo = pytest.importorskip("dvc.repo")
    with dvc_repo.Repo(str(REPO)) as repo:
        theirs = {stage.addressing: sorted(str(o.def_path) for o in stage.outs if o.metric)
                  for stage in repo.index.stages}
        their_outs = {stage.addressing: sorted(str(o.def_path) for o in stage.outs)
                      for stage in repo.index.stages}
    stages = load_pipeline(REPO).stages
    assert {s.name: sorted(s.metrics) for s in stages} == theirs
    assert {s.name: sorted(s.outs) for s in stages} == their_outs


def test_a_per_row_headline_merges_a_matrix_stages_files(tmp_path):
    """One metrics file per combination (cvfp-grid): the rows of all of them, in one table;
    a key two combinations both write is an error, not a silent overwrite."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"runs": ["a", "b"]}))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"grid": {
        "matrix": {"run": "${runs}"}, "cmd": "true",
        "metrics": [{"m/${item.run}.json": {"cache": False}}]}}}))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.json").write_text(json.dumps({"a__ppl": 1.5, "a__other": 0}))
    (tmp_path / "m" / "b.json").write_text(json.dumps({"b__ppl": 2.5}))
    headline = Headline("grid", "Grid", "grid", (Figure("ppl", "PPL", ".1f"),), rows=r"(\w+?)__")
    pipeline = load_pipeline(tmp_path)
    assert metrics_files(pipeline, headline) == ["m/a.json", "m/b.json"]
    section = read_section(pipeline, headline, tmp_path)
    assert section.rows == (("a", {"ppl": 1.5}), ("b", {"ppl": 2.5}))
    single = Headline("grid", "Grid", "grid", (Figure("a__ppl", "PPL", ".1f"),))
    with pytest.raises(NewllmError, match="needs a stage with one metrics file"):
        metrics_files(pipeline, single)
    (tmp_path / "m" / "b.json").write_text(json.dumps({"b__ppl": 2.5, "a__ppl": 9.0}))
    with pytest.raises(NewllmError, match=r"m/b\.json repeats 'a__ppl'"):
        read_section(pipeline, headline, tmp_path)


def test_the_report_of_the_committed_metrics_fits_a_terminal():
    """What `newllm report` prints from the repository's metrics/ is at most WIDTH columns
    (the Infini table alone was 749). report/README.md keeps one Markdown table per section,
    however wide: it is read rendered, where a table scrolls, not in a terminal."""
    pipeline = load_pipeline(REPO)
    sections, stale = [], []
    for headline in HEADLINES:
        try:
            sections.append(read_section(pipeline, headline, REPO))
        except NewllmError as error:  # metrics not yet made by the committed run
            stale.append(f"{headline.name} ({error})")
    text = terminal_text(sections)
    assert max(map(len, text.splitlines())) <= WIDTH, max(text.splitlines(), key=len)
    for section in sections:
        assert textwrap.wrap(section.headline.title, WIDTH)[0] in text.splitlines()
    if stale:  # shown in every test run until the pipeline has made them, never hidden
        pytest.xfail(f"{len(stale)} of {len(HEADLINES)} sections have stale committed "
                     f"metrics: {'; '.join(stale)}")


def test_each_line_declares_its_headlines_found_in_report_order():
    assert [h.name for h in HEADLINES] == REPORT_ORDER
    for headline in HEADLINES:
        line = headline.source.split("/")[1]
        assert headline.source == f"newllm/{line}/headlines.py"
        assert (REPO / headline.source).is_file()
    # core names no line, and the report finds the headlines without importing torch
    for core in ("headlines.py", "report.py"):
        named = re.findall(r"newllm\.(\w+)", (REPO / "newllm/core" / core).read_text())
        assert set(named) <= {"core"}, (core, named)
    code = ("import sys; from newllm.core.headlines import headlines; "
            "import newllm.core.report; assert len(headlines()) >= 8; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_headline_can_name_one_item_of_a_foreach_stage(tmp_path):
    """eval-ppl-cvfp@separate: that item's metrics file, its `${item}` / `${key}` resolved."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "ev": {"foreach": ["separate", "stream"],
               "do": {"cmd": "true", "metrics": [{"m/ppl_${item}.json": {"cache": False}}]}},
        "kv": {"foreach": {"a": {"n": 1}, "b": {"n": 2}},
               "do": {"cmd": "true", "metrics": [{"m/${key}_${item.n}.json": {"cache": False}}]}},
    }}))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "ppl_separate.json").write_text(json.dumps({"ppl": 1.25}))
    (tmp_path / "m" / "ppl_stream.json").write_text(json.dumps({"ppl": 9.0}))
    pipeline = load_pipeline(tmp_path)
    one = Headline("ppl", "PPL", "ev@separate", (Figure("ppl", "PPL", ".2f"),))
    assert metrics_files(pipeline, one) == ["m/ppl_separate.json"]
    assert read_section(pipeline, one, tmp_path).rows == (("", {"ppl": 1.25}),)
    assert metrics_files(pipeline, Headline("k", "K", "kv@b", ())) == ["m/b_2.json"]
    with pytest.raises(NewllmError, match="needs a stage with one metrics file"):
        metrics_files(pipeline, Headline("ppl", "PPL", "ev", one.figures))
    with pytest.raises(NewllmError, match="names stage 'ev@other'"):
        metrics_files(pipeline, Headline("ppl", "PPL", "ev@other", one.figures))


def test_a_series_whose_x_restarts_is_one_line_per_group(tmp_path):
    """CVFP phase 1 writes both blocks to one file, the iteration restarting at 0: a line per
    block, named by the column that tells them apart, not one zigzag back to the start."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {}}))
    (tmp_path / "p.csv").write_text("block,iteration,rank\n" + "".join(
        f"{b},{i},{10 - i + b}\n" for b in (0, 1) for i in range(4)))
    (tmp_path / "q.csv").write_text("step,rank\n" + "".join(f"{i},{i}\n" for i in range(5)))
    pipeline = load_pipeline(tmp_path)
    spec = PlotSpec("Rank", ("p.csv",), {"p.csv": "iteration"}, {"p.csv": ("rank",)})
    series = plot_data(pipeline, spec, tmp_path)
    assert [(s.group, s.xs, s.ys) for s in series] == [
        ("block 0", [0, 1, 2, 3], [10, 9, 8, 7]), ("block 1", [0, 1, 2, 3], [11, 10, 9, 8])]
    assert plot_png(spec, series).startswith(PNG_MAGIC)
    plain = PlotSpec("Rank", ("q.csv",), {"q.csv": "step"}, {"q.csv": ("rank",)})
    assert [s.group for s in plot_data(pipeline, plain, tmp_path)] == [""]


def test_a_long_plot_title_is_wrapped_not_clipped():
    from newllm.core.report import _title

    title = ("Chameleon tag accuracy vs alpha (likelihood scoring; beta and edit ratio scale "
             "with alpha)")
    wrapped = _title(title)
    assert wrapped.replace("\n", " ") == title
    assert len(wrapped.splitlines()) == 2 and max(map(len, wrapped.splitlines())) <= 64
