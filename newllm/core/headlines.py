"""What a headline figure is, and where each line of research declares its own.

Each line declares its sections in `newllm/<line>/headlines.py` (torch-free, exposing
`HEADLINES: tuple[Headline, ...]`); `headlines()` finds them through `cli.lines()`, so
the plumbing never names a line. `newllm report` prints one table per `Headline`, in
`order` (ties: line, then declaration order), from the metrics file of the named
dvc.yaml stage. A new line adds its section there (and nowhere else): a title, the
stage, and the metrics keys with their labels and formats. A per-row table (one row
per layer, say) gives a `rows` regex whose first group is the row's name:
`layer(\\d+)_` reads `layer15_mlp_top1` as row 15, column key `mlp_top1`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace

from newllm.core.cli import PACKAGE, lines


@dataclass(frozen=True)
class Figure:
    """One headline figure: a metrics key, its label and how to print it.

    `fmt` is a `format()` spec: `.3f` for a float, `,d` for an integer, `` for any
    value as text. A figure missing from the metrics file means the metrics are stale.
    """

    key: str
    label: str
    fmt: str = ""


@dataclass(frozen=True)
class Headline:
    """One line of research: a section of the report and a key of `newllm report --json`."""

    name: str  # the --json key: short, stable, snake_case
    title: str
    # The dvc.yaml stage with one metrics file: a stage's name, a matrix stage's name without
    # @... (its combinations' files merged, per-row), or one foreach item (eval-ppl-cvfp@separate)
    stage: str
    figures: tuple[Figure, ...]
    rows: str | None = None  # regex matched at the start of each key; group 1 names the row
    row_label: str = "row"
    note: str = ""  # one sentence under the table in report/README.md
    order: int = 1000  # place in the report among every line's sections (lower first)
    source: str = field(default="", compare=False)  # set by headlines(): the declaring file


def headlines() -> tuple[Headline, ...]:
    """Every line's headlines, in report order; each knows the file that declares it."""
    found: list[Headline] = []
    for line in lines():
        if not (PACKAGE / line / "headlines.py").is_file():
            continue
        module = importlib.import_module(f"newllm.{line}.headlines")
        declared = getattr(module, "HEADLINES", None)
        if not isinstance(declared, tuple) or not all(isinstance(h, Headline) for h in declared):
            raise RuntimeError(f"newllm/{line}/headlines.py: HEADLINES must be a tuple of "
                               "Headline.")
        found += [replace(h, source=f"newllm/{line}/headlines.py") for h in declared]
    names = [h.name for h in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RuntimeError(f"two headlines are named {', '.join(twice)} "
                           f"({', '.join(h.source for h in found if h.name in twice)}).")
    return tuple(sorted(found, key=lambda h: h.order))  # stable: ties keep line order
