"""Devices, seeding and progress bars: the few things every stage needs at run time."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from newllm.core.errors import NewllmError

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NewllmError("base.device is 'cuda' but no CUDA device is available; "
                          "use 'auto' or 'cpu'.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise NewllmError("base.device is 'mps' but MPS is not available; use 'auto' or 'cpu'.")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def slow_bfloat16(device: torch.device) -> bool:
    """True on a CPU without native bfloat16 matrix products (no AVX-512 BF16 / AMX), where
    oneDNN falls back to a path about 100x slower than float32 (measured: 1 vs 130 GFLOP/s)."""
    return device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_if_slow_bfloat16(device: torch.device, what: str) -> None:
    if slow_bfloat16(device):
        print(f"warning: this CPU has no native bfloat16 matrix products; {what} in bfloat16 "
              "will be much slower than in float32", file=sys.stderr)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch, ask torch for deterministic kernels; return a CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread inside the block, for work made of many small products (a
    matrix-vector product per token, a tiny model's layers): a second thread only adds
    synchronisation (measured 10x to 30x slower on a shared 2-core machine), and one thread
    makes float32 sums the same on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress(iterable: Iterable[T], desc: str, total: int | None = None,
             unit: str = "it") -> Iterable[T]:
    """A tqdm bar that stays quiet when stderr is not a terminal (DVC logs, CI)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False)
