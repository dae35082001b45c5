"""`newllm bench`: each benchmark runs at tiny size and ends with `<name> speedup: <ratio>x`."""

from __future__ import annotations

import math
import re

import pytest


@pytest.mark.parametrize("name,args", [
    ("eval-ppl", ("--max-tokens", "120", "--context-length", "16", "--stride", "8",
                  "--batch-size", "4")),
    ("extract-pairs", ("--num-tokens", "24", "--batch-size", "8", "--exact-tokens", "4")),
])
def test_bench_ends_with_a_positive_finite_speedup(run_cli, tiny_model, prepared_tiny, tmp_path,
                                                   name, args):
    extra = ("--data", str(prepared_tiny)) if name == "eval-ppl" else ()
    result = run_cli("bench", name, "--model", str(tiny_model), "--device", "cpu", *extra, *args,
                     cwd=tmp_path)
    assert result.code == 0, result.err
    last = result.out.strip().splitlines()[-1]
    match = re.fullmatch(rf"{re.escape(name)} speedup: ([0-9.]+)x", last)
    assert match, result.out
    ratio = float(match[1])
    assert math.isfinite(ratio) and ratio > 0, last
    assert list(tmp_path.iterdir()) == []  # a benchmark writes nothing


def test_bench_prep_cache_matches_the_loop(run_cli, tiny_model, prepared_tiny, tmp_path):
    result = run_cli("bench", "prep-cache", "--model", str(tiny_model), "--blocks",
                     str(tmp_path / "none.safetensors"), "--data", str(prepared_tiny),
                     "--tokens", "300", "--naive-tokens", "100", "--rss-tokens", "100",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    lines = result.out.strip().splitlines()
    assert re.fullmatch(r"prep-cache speedup: [0-9.]+x", lines[-1]), result.out
    diffs = [float(m[1]) for m in re.finditer(r"max \|difference\| ([0-9.e+-]+)", result.out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, result.out
    assert re.search(r"peak RSS growth at 4x the stream: -?[0-9.]+%", result.out)
    assert list(tmp_path.iterdir()) == []
