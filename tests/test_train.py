"""The shared training loop (newllm.core.train): float32 reproduces the converter's former plain
loop exactly, bfloat16 trains with float32 weights, errors name the key, seeds repeat, and
several processes split every batch."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from newllm.core.errors import NewllmError
from newllm.core.train import Epoch, TrainConfig, Trainer, shard, write_history_csv
from newllm.virtual_tokens.converter import Converter, ConverterConfig
from newllm.virtual_tokens.fit import fit_converter, mse, split_by_token


def previous_fit_converter(converter, x_train, y_train, x_val, y_val, *, epochs, batch_size,
                           lr, generator):
    """The converter's plain loop before newllm.core.train (git 4a5346a), as the reference."""
    converter.init_from_data(x_train, y_train)
    optimizer = torch.optim.Adam(converter.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    history = []
    for epoch in range(1, epochs + 1):
        converter.train()
        order = torch.randperm(len(x_train), generator=generator)
        summed = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            loss = F.mse_loss(converter(x_train[rows]), y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            summed += loss.item() * len(rows)
        converter.eval()
        history.append((epoch, summed / len(order), mse(converter, x_val, y_val)))
    return history


def _pairs(n: int = 300, d_in: int = 24, d_out: int = 16, seed: int = 0):
    """A noisy nonlinear map with a large-scale input dimension, like hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * torch.linspace(0.1, 20.0, d_in)
    y = torch.tanh(x[:, :d_out] / 5) + 0.1 * torch.randn(n, d_out, generator=g)
    return x, y


def _fit(fit, model_type: str, seed: int = 0, **options):
    x, y = _pairs()
    g = torch.Generator().manual_seed(seed)
    train, val = split_by_token(torch.arange(len(x)), 0.2, g)
    torch.manual_seed(seed)
    converter = Converter(ConverterConfig(model_type, x.shape[1], y.shape[1], hidden_dim=32))
    history = fit(converter, x[train], y[train], x[val], y[val], epochs=6, batch_size=32,
                  lr=1e-2, generator=g, **options)
    return converter, history


@pytest.mark.parametrize("model_type", ["linear", "mlp"])
def test_float32_reproduces_the_previous_converter_loop_exactly(model_type):
    reference, expected = _fit(previous_fit_converter, model_type)
    converter, history = _fit(fit_converter, model_type, compute_dtype="float32")
    assert [(e.epoch, e.train_loss, e.val_loss) for e in history] == expected  # bit for bit
    assert expected[-1][1] < 0.5 * expected[0][1]  # and it did learn something
    for (name, got), want in zip(converter.state_dict().items(),
                                 reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def _toy_regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 4, generator=g) + 0.5
    return x, y


def _train_toy(compute_dtype: str, seed: int = 0, lr: float = 3e-2, loss_fn=None,
               epochs: int = 20):
    x, y = _toy_regression()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    seen_dtypes = set()

    def regression(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        out = m(x[rows])
        seen_dtypes.add(out.dtype)
        return F.mse_loss(out.float(), y[rows])

    trainer = Trainer(TrainConfig("toy", epochs=epochs, batch_size=64, lr=lr,
                                  compute_dtype=compute_dtype))
    history = trainer.fit(model, loss_fn or regression, len(x),
                          torch.Generator().manual_seed(seed),
                          evaluate=lambda m: F.mse_loss(m(x), y).item())
    return model, history, seen_dtypes


def test_bfloat16_trains_with_float32_weights():
    model, history, seen = _train_toy("bfloat16")
    assert seen == {torch.bfloat16}  # the forward really ran under bf16 autocast
    assert history[-1].train_loss < 0.01 * history[0].train_loss
    assert history[-1].val_loss < 0.01 * history[0].val_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the model comes back without Accelerate's autocast wrapper: a plain float32 forward
    x, _ = _toy_regression()
    first, last = model[0], model[2]
    with torch.no_grad():
        expected = F.linear(F.gelu(F.linear(x, first.weight, first.bias)), last.weight,
                            last.bias)
        assert model(x).dtype == torch.float32
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # and bf16 is not float32 under another name: the curve differs
    _, history32, seen32 = _train_toy("float32")
    assert seen32 == {torch.float32}
    assert history32[-1].train_loss != history[-1].train_loss
    assert history[-1].val_loss == pytest.approx(history32[-1].val_loss, rel=0.5)


def test_precisions_can_alternate_in_one_process():
    for dtype in ("bfloat16", "float32", "bfloat16"):
        assert _train_toy(dtype, epochs=1)[2] == {getattr(torch, dtype)}


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_same_seed_gives_identical_weights(compute_dtype):
    a, history_a, _ = _train_toy(compute_dtype, seed=3, epochs=3)
    b, history_b, _ = _train_toy(compute_dtype, seed=3, epochs=3)
    c, _, _ = _train_toy(compute_dtype, seed=4, epochs=3)
    assert history_a == history_b
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a[0].weight, c[0].weight)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_non_finite_loss_is_an_error_naming_the_key(compute_dtype):
    def exploding(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return m(torch.full((len(rows), 16), float("inf"))).sum()

    with pytest.raises(NewllmError, match=r"toy\.lr \(0\.03\)") as error:
        _train_toy(compute_dtype, loss_fn=exploding, epochs=2)
    assert ("toy.compute_dtype" in str(error.value)) == (compute_dtype == "bfloat16")


def test_bad_options_name_the_key():
    with pytest.raises(NewllmError, match=r"toy\.compute_dtype .*float32, bfloat16"):
        TrainConfig("toy", epochs=1, batch_size=1, lr=1e-3, compute_dtype="float16")
    with pytest.raises(NewllmError, match=r"toy\.optimizer"):
        TrainConfig("toy", epochs=1, batch_size=1, lr=1e-3, optimizer="sgd")


def test_constant_schedule_and_adamw_run():
    x, y = _toy_regression()
    model = nn.Linear(16, 4)
    trainer = Trainer(TrainConfig("toy", epochs=2, batch_size=128, lr=1e-2, optimizer="adamw",
                                  weight_decay=0.1, schedule="constant"))
    history = trainer.fit(model, lambda m, rows: F.mse_loss(m(x[rows]), y[rows]), len(x),
                          torch.Generator().manual_seed(0))
    assert [e.epoch for e in history] == [1, 2] and history[0].val_loss is None


def test_shard_splits_each_batch_across_processes():
    rows = torch.tensor([9, 4, 7, 1, 8, 2, 0])
    for count in (1, 2, 3, 7):
        shares = [shard(rows, i, count) for i in range(count)]
        assert torch.equal(torch.cat(shares), rows)  # disjoint, complete, in order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # fewer rows than processes: every process still gets one (wrapping around)
    assert [shard(rows[:2], i, 5).tolist() for i in range(5)] == [[9], [4], [9], [4], [9]]


def test_write_history_csv(tmp_path):
    write_history_csv(tmp_path / "a.csv", [Epoch(1, 0.5, 0.25), Epoch(2, 1 / 3, 0.125)])
    assert (tmp_path / "a.csv").read_text() == (
        "epoch,train_loss,val_loss\n1,0.5,0.25\n2,0.33333333,0.125\n")
    write_history_csv(tmp_path / "b.csv", [Epoch(1, 2.0)])
    assert (tmp_path / "b.csv").read_text() == "epoch,train_loss\n1,2\n"


def _two_process_fit(out: str) -> None:
    """Runs in each process: 3 epochs of 4 batches of 16; writes <out>-<process>.safetensors
    with the weights and the example indices this process trained on."""
    x, y = _toy_regression()
    x, y = x[:64], y[:64]
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    trainer = Trainer(TrainConfig("toy", epochs=3, batch_size=16, lr=1e-2))
    seen = []

    def loss_fn(m: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        seen.append(rows)
        return F.mse_loss(m(x[rows]), y[rows])

    history = trainer.fit(model, loss_fn, len(x), torch.Generator().manual_seed(0))
    save_file({"rows": torch.cat(seen), "history": torch.tensor([e.train_loss for e in history]),
               **model.state_dict()}, f"{out}-{trainer.accelerator.process_index}.safetensors")


def test_two_processes_match_one(tmp_path):
    """Two processes, each taking half of every batch (gradients averaged), take the same
    steps as one process with the whole batch, up to rounding. Launched by torchrun (what
    `accelerate launch` runs on GPUs; on CPU it wants MPI), in fresh processes: a fork of a
    process that already ran torch's thread pool can hang."""
    script = tmp_path / "two.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from test_train import _two_process_fit\n_two_process_fit(sys.argv[1])\n")
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(port)]
    subprocess.run([*launch, str(script), str(tmp_path / "two")], check=True, timeout=300,
                   capture_output=True)
    _two_process_fit(str(tmp_path / "one"))
    one, first, second = (load_file(tmp_path / f"{n}.safetensors")
                          for n in ("one-0", "two-0", "two-1"))
    # each batch of 16 is split 8 + 8, in order
    batches = one["rows"].view(-1, 16)
    assert torch.equal(first["rows"].view(-1, 8), batches[:, :8])
    assert torch.equal(second["rows"].view(-1, 8), batches[:, 8:])
    for name, value in one.items():
        if name != "rows":
            torch.testing.assert_close(first[name], value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(second[name], value, rtol=1e-5, atol=1e-6)
