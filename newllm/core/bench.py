"""`newllm bench <name>`: each fast path against its naive reference, measured in one run.

Every benchmark prints both results (they must agree) and, as its last line,
`<name> speedup: <ratio>x`. Defaults of what a stage also has (model, data) are the
stage's own, so the benchmark measures what the pipeline runs. Each line of research keeps
its benchmarks in its own `bench.py`, registering them on the `bench` group below; the
group finds those modules on disk (the plumbing never imports a line by name).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import torch

from newllm.core.params import field_specs

T = TypeVar("T")


class BenchGroup(click.Group):
    """The bench group: imports every line's `bench.py` before listing or finding a bench."""

    def _load_lines(self) -> None:
        from newllm.core.cli import PACKAGE, lines

        for line in lines():
            if (PACKAGE / line / "bench.py").exists():
                importlib.import_module(f"newllm.{line}.bench")

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_lines()
        return sorted(self.commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            self._load_lines()
        return self.commands.get(name)


@click.group("bench", cls=BenchGroup)
def bench() -> None:
    """Benchmarks: fast path vs naive reference on the same inputs, printed as ratios."""


def stage_default(params_class: type, key: str) -> Any:
    """A stage's own default (params.yaml agrees with it; tests/test_params_defaults.py)."""
    return {spec.name: spec.default for spec in field_specs(params_class)}[key]


def stage_checked(params_class: type, **values: tuple[str, Any]) -> Any:
    """Check bench options by the stage's own rules: `key=(option, value)` for each option
    that sets the stage's `key`. A value the stage refuses is the same one-line error here,
    naming the bench option and the stage key (type, range, choices, then the dataclass's
    `check()`); returns the stage's params object with those values."""
    from newllm.core.params import build_params

    return build_params(params_class, None, {key: value for key, (_, value) in values.items()},
                        options={key: option for key, (option, _) in values.items()})

def gemm_peak_gflops(shapes: set[tuple[int, int]], rows: int, dtype: torch.dtype,
                     seconds: float = 0.3) -> float:
    """The best GFLOP/s of [rows, k] @ [k, n] over the model's (k, n) weight shapes."""
    best = 0.0
    generator = torch.Generator().manual_seed(0)
    for k, n in sorted(shapes):
        a = torch.randn(rows, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        a @ b  # warm-up
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or reps < 2:
            a @ b
            reps += 1
        best = max(best, 2 * rows * k * n * reps / elapsed / 1e9)
    return best


def linear_shapes(model: torch.nn.Module) -> tuple[set[tuple[int, int]], int, int]:
    """(in, out) shapes of the model's linear layers, their weights below the LM head, and the
    head's size; the head is `get_output_embeddings()`."""
    head = model.get_output_embeddings()
    body = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    shapes = {(m.in_features, m.out_features) for m in body}
    shapes.add((head.in_features, head.out_features))
    return shapes, sum(m.weight.numel() for m in body), head.weight.numel()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


