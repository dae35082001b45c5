"""One training loop for every trainer: Accelerate, bfloat16 mixed precision, seeded batches.

A trainer gives `Trainer.fit` its model and a loss function of a batch of example indices;
the loop owns what every trainer would otherwise repeat: the device (one process per GPU
under `accelerate launch`), float32 or bfloat16 autocast, the seeded per-epoch shuffle,
Adam with a cosine-to-0 (or constant) learning rate, per-epoch metrics, the progress bar
and a clear error when the loss stops being finite.

    trainer = Trainer(TrainConfig("train_converter", epochs=30, batch_size=256, lr=1e-3))
    x, y = x.to(trainer.device), y.to(trainer.device)
    history = trainer.fit(model, lambda m, rows: F.mse_loss(m(x[rows]), y[rows]), len(x),
                          generator)

In bfloat16 the weights, gradients and optimizer state stay float32; only the loss
function's forward runs under autocast (matrix products in bfloat16), so the model that
comes back, and `evaluate`, are plain float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from torch import nn

from newllm.core.artifacts import write_csv
from newllm.core.errors import NewllmError
from newllm.core.params import check_choices
from newllm.core.runtime import progress, resolve_device, warn_if_slow_bfloat16

COMPUTE_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16"}  # Accelerate's names

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, example indices) -> loss


@dataclass(frozen=True)
class TrainConfig:
    key: str  # the trainer's params group, named in errors ("train_converter" -> .lr)
    epochs: int
    batch_size: int
    lr: float
    compute_dtype: str = "float32"  # float32 | bfloat16 (autocast; weights stay float32)
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine (to 0 over all steps) | constant
    device: str | torch.device = "cpu"  # auto | cpu | cuda | mps
    lr_key: str = "lr"  # the learning rate's key in the trainer's params group, for errors

    def __post_init__(self) -> None:
        check_choices(self.key, (("compute_dtype", self.compute_dtype, COMPUTE_DTYPES),
                                 ("optimizer", self.optimizer, OPTIMIZERS),
                                 ("schedule", self.schedule, SCHEDULES)))


@dataclass(frozen=True)
class Epoch:
    epoch: int
    train_loss: float  # mean loss over the epoch's examples
    val_loss: float | None = None  # evaluate(model) after the epoch, if given


def shard(rows: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Process `index` of `count`'s contiguous share of one batch (all of it for one process)."""
    if len(rows) < count:  # every process must join each gradient all-reduce: wrap around
        rows = rows.repeat(math.ceil(count / len(rows)))[:count]
    return rows.tensor_split(count)[index]


def make_accelerator(compute_dtype: str, device: str | torch.device) -> Accelerator:
    """An Accelerator on `device` (cpu, or the launcher's GPU) with `compute_dtype` autocast."""
    device = resolve_device(device) if isinstance(device, str) else device
    # Accelerate keeps one state per process and refuses a second Accelerator with another
    # precision or device (tests, two trainers in one run), so each trainer starts afresh;
    # the process group of a multi-process `accelerate launch` is kept.
    launched = PartialState._shared_state.get("num_processes", 1) > 1
    AcceleratorState._reset_state(reset_partial_state=not launched)
    if compute_dtype == "bfloat16":
        warn_if_slow_bfloat16(device, "training")
    return Accelerator(mixed_precision=MIXED_PRECISION[compute_dtype], cpu=device.type == "cpu")


def is_main_process() -> bool:
    """False on all processes but one under a multi-process `accelerate launch`."""
    return PartialState().is_main_process


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.accelerator = make_accelerator(config.compute_dtype, config.device)

    @property
    def device(self) -> torch.device:
        """Where the loss function's tensors should live."""
        return self.accelerator.device

    def _non_finite(self, loss: float, epoch: int) -> None:
        c = self.config
        hint = f" or set {c.key}.compute_dtype to float32" if c.compute_dtype != "float32" else ""
        raise NewllmError(f"the training loss became {loss} at epoch {epoch}; lower "
                          f"{c.key}.{c.lr_key} ({c.lr}){hint}.")

    def fit(self, model: nn.Module, loss_fn: LossFn, n_examples: int,
            generator: torch.Generator, evaluate: Callable[[nn.Module], float] | None = None,
            desc: str | None = None, parameters: Iterable[Any] | None = None,
            stop: Callable[[nn.Module, Epoch], bool] | None = None) -> list[Epoch]:
        """Train `model` in place on batches of indices into `n_examples`; per-epoch metrics.

        Each epoch draws a permutation from `generator`; with several processes each one
        takes its shard of every batch. The model comes back float32 on `self.device`.
        `parameters`: what the optimizer updates, parameters or parameter groups (each with
        its own `lr`); default every parameter of `model`. `stop(model, epoch)`, asked after
        each epoch (in eval mode, without gradients): True ends training there, an early
        stop (pair it with the constant schedule: a cosine one has not reached 0 then).
        """
        c, acc = self.config, self.accelerator
        if n_examples < 1:
            raise NewllmError(f"{c.key}: there are no training examples to fit.")
        prepared = acc.prepare(model)  # to the device; wrapped for several processes
        # Accelerate also wraps forward in autocast; undo that so evaluate() and the caller
        # get the float32 model, and autocast only the loss function below.
        model = acc.unwrap_model(prepared, keep_fp32_wrapper=False)
        optimizer_class = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
        optimizer = optimizer_class(model.parameters() if parameters is None else parameters,
                                    lr=c.lr, weight_decay=c.weight_decay)
        steps = c.epochs * math.ceil(n_examples / c.batch_size)
        if c.schedule == "cosine":  # decays to 0 so the last epoch settles
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        else:
            schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        history = []
        for epoch in progress(range(1, c.epochs + 1), desc=desc or c.key, unit="epoch"):
            model.train()
            order = torch.randperm(n_examples, generator=generator)
            summed, seen = 0.0, 0
            for start in range(0, n_examples, c.batch_size):
                rows = shard(order[start:start + c.batch_size], acc.process_index,
                             acc.num_processes)
                with acc.autocast():
                    loss = loss_fn(prepared, rows)
                if not math.isfinite(loss.item()):  # stop now, not after a wasted epoch
                    self._non_finite(loss.item(), epoch)
                optimizer.zero_grad(set_to_none=True)
                # Processes average their gradients with equal weight: weigh each shard's mean
                # loss by its share of the batch so an uneven last batch counts every row once
                # (the factor is exactly 1 with one process).
                batch_rows = min(c.batch_size, n_examples - start)
                acc.backward(loss * (len(rows) * acc.num_processes / batch_rows))
                optimizer.step()
                schedule.step()
                summed += loss.item() * len(rows)
                seen += len(rows)
            if acc.num_processes > 1:
                totals = acc.reduce(torch.tensor([summed, seen], dtype=torch.float64,
                                                 device=acc.device), "sum")
                summed, seen = totals.tolist()
            train_loss = summed / seen
            if not math.isfinite(train_loss):
                self._non_finite(train_loss, epoch)
            model.eval()
            val_loss = None
            if evaluate is not None:
                with torch.no_grad():
                    val_loss = evaluate(model)
            history.append(Epoch(epoch, train_loss, val_loss))
            if stop is not None:
                with torch.no_grad():
                    if stop(model, history[-1]):
                        break
        return history


def write_history_csv(path: str | Path, history: list[Epoch]) -> None:
    """Per-epoch losses as plot data: epoch, train_loss[, val_loss] (8 significant digits)."""
    with_val = any(e.val_loss is not None for e in history)
    header = ["epoch", "train_loss"] + (["val_loss"] if with_val else [])
    write_csv(path, header, [[e.epoch, f"{e.train_loss:.8g}"]
                             + ([f"{e.val_loss:.8g}"] if with_val else []) for e in history])
