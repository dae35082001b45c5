"""Memory on a pretrained base: α = 0 leaves the logits exactly, distillation reproduces layer
0, the fine-tuning groups get the scaled learning rates, and the stage end to end."""

from __future__ import annotations

import json

import torch
from conftest import assert_one_line_error

from newllm.core.base import load_base
from newllm.core.hidden import decoder_of
from newllm.core.reversal import SHIPPED_PAIRS, injected_split, read_pairs
from newllm.infini.adapter import (
    InfiniLayer,
    attach_parallel,
    attach_replace,
    distill,
    distill_error,
    lm_loss,
    memory_config,
    parameter_groups,
    reset_memory,
)

# the shipped pairs the adapters inject (train_infini_adapter.reversal_inject_fraction 0.5)
HALF = len(injected_split(read_pairs(str(SHIPPED_PAIRS), "csv"), 0.5)[0])


def _ids(model, n_rows: int = 2, length: int = 33, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n_rows, length), generator=g)


def test_parallel_adapter_with_alpha_zero_gives_the_base_logits_exactly(tiny_model):
    base = load_base(str(tiny_model), device="cpu").model
    ids = _ids(base)
    with torch.no_grad():
        before = [base(input_ids=ids[:, s:s + 8]).logits for s in range(0, 32, 8)]
    wrapped = attach_parallel(base, memory_config(base))
    assert float(wrapped.alpha) == 0.0
    reset_memory(base)
    with torch.no_grad():
        after = [base(input_ids=ids[:, s:s + 8]).logits for s in range(0, 32, 8)]
    assert wrapped.adapter.attn.segment_counter == 4  # the memory was written all along
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with torch.no_grad():
        wrapped.alpha.fill_(0.5)
        reset_memory(base)
        base(input_ids=ids[:, :8])
        moved = base(input_ids=ids[:, 8:16]).logits
    assert not torch.allclose(moved, before[1])  # a non-zero α reads the memory


def test_distillation_reproduces_layer0_on_held_out_text(tiny_model, prepared_tiny):
    from newllm.core.data import load_split
    from newllm.core.ppl import build_stream
    from newllm.infini.training import make_sequences

    base = load_base(str(tiny_model), device="cpu").model
    streams = {split: build_stream(load_split(prepared_tiny, split).documents()[0], 0)[0]
               for split in ("train", "val")}
    train = make_sequences(streams["train"], 32)  # train documents
    held_out = make_sequences(streams["val"], 32)[:8]  # documents never distilled on
    torch.manual_seed(0)
    infini = InfiniLayer(memory_config(base), d_ff=64)
    before = distill_error(infini, base, held_out, 8)
    history = distill(infini, base, train, 8, epochs=4, lr=3e-3, batch_size=8,
                      generator=torch.Generator().manual_seed(0))
    after = distill_error(infini, base, held_out, 8)
    assert before == 1.0  # the Infini layer starts as the identity
    assert history[-1] < history[0]
    # stated tolerance: on held-out documents the distilled layer misses under 80% of layer
    # 0's change (1.0 = no better than passing the hidden state through; 0.66 measured
    # after these 4 epochs on the tiny model, whose layer 0 attends within the segment,
    # which a memory-only layer cannot see)
    assert after < 0.8, (before, after)
    original = attach_replace(base, infini)
    assert decoder_of(base).layers[0].infini is infini and original is not None
    assert torch.isfinite(lm_loss(base, held_out, 8))


def test_parameter_groups_get_the_scaled_learning_rates(tiny_model):
    base = load_base(str(tiny_model), device="cpu").model
    base.requires_grad_(True)
    infini = InfiniLayer(memory_config(base), d_ff=64)
    attach_replace(base, infini)
    groups = parameter_groups(base, 1e-4, layer0_lr_scale=2.0, other_lr_scale=0.5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["layer0_infini"]["lr"] == 2e-4
    assert by_name["embeddings"]["lr"] == by_name["layers_1_to_n"]["lr"] == 5e-5
    assert {id(p) for p in by_name["layer0_infini"]["params"]} == \
        {id(p) for p in infini.parameters()}
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every)) == len({id(p) for p in base.parameters()})
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_the_stage_in_both_modes(run_cli, tiny_model, prepared_tiny, tmp_path):
    common = ("--model", str(tiny_model), "--device", "cpu", "--data", str(prepared_tiny),
              "--segment-length", "16", "--segments-per-sequence", "2", "--max-train-tokens",
              "400", "--val-max-tokens", "200", "--d-ff", "32")
    result = run_cli("train-infini-adapter", *common, "--mode", "parallel", "--out", "p.st",
                     "--metrics", "p.json", "--reversal-facts", "null", cwd=tmp_path)
    assert result.code == 0, result.err
    parallel = json.loads((tmp_path / "p.json").read_text())
    assert parallel["step0_max_abs_logit_diff"] == 0.0  # α = 0: exactly the base
    assert parallel["alpha"] != 0.0
    result = run_cli("train-infini-adapter", *common, "--mode", "replace", "--out", "r.st",
                     "--metrics", "r.json", "--reversal-facts", "shipped",
                     "--reversal-repeats", "1", "--max-train-tokens", "1200", cwd=tmp_path)
    assert result.code == 0, result.err
    replace = json.loads((tmp_path / "r.json").read_text())
    assert {"distill_error_held_out", "after_distill_val_ppl", "val_ppl"} <= set(replace)
    result = run_cli("train-infini-adapter", *common, "--mode", "replace",
                     "--freeze-base-model", "true", "--out", "x.st", "--metrics", "x.json",
                     cwd=tmp_path)
    assert_one_line_error(result, "freeze_base_model", "parallel")
    assert not (tmp_path / "x.st").exists() and not (tmp_path / "x.json").exists()


def _trained_logits(model, ids, segment_length):
    from newllm.infini.adapter import segmented_logits

    return segmented_logits(model, ids, segment_length)


def test_the_artifact_rebuilds_the_trained_model(run_cli, tiny_model, prepared_tiny, tmp_path):
    """Whole model (full fine-tuning, replace) or adapter and α only (frozen base): loading the
    artifact onto a fresh base gives the logits the stage's own trained model gives."""
    from newllm.core.artifacts import read_meta
    from newllm.infini.adapter import load_adapted
    from newllm.infini.training import single_thread

    common = ("--model", str(tiny_model), "--device", "cpu", "--data", str(prepared_tiny),
              "--segment-length", "16", "--segments-per-sequence", "2", "--max-train-tokens",
              "1200", "--val-max-tokens", "100", "--d-ff", "32", "--reversal-repeats", "1",
              "--finetune-lr", "0.01")
    ids = _ids(load_base(str(tiny_model), device="cpu").model, length=40)
    for name, extra in (("full", ("--mode", "parallel")),
                        ("frozen", ("--mode", "parallel", "--freeze-base-model", "true")),
                        ("replace", ("--mode", "replace"))):
        result = run_cli("train-infini-adapter", *common, *extra, "--out", f"{name}.st",
                         "--metrics", f"{name}.json", cwd=tmp_path)
        assert result.code == 0, (name, result.err)
        meta = read_meta(tmp_path / f"{name}.st")
        assert meta["extra"]["whole_model"] == (name != "frozen")
        assert len(meta["extra"]["reversal"]["injected"]) == HALF  # half the shipped pairs
        base = load_base(str(tiny_model), device="cpu")
        plain = _trained_logits(base.model, ids, 16)
        load_adapted(base.model, tmp_path / f"{name}.st", base.info.as_dict())
        with single_thread():
            loaded = _trained_logits(base.model, ids, 16)
        # the fine-tuning moved the model: the artifact is not the base
        assert not torch.allclose(loaded, plain), name
        # rebuild independently: a fresh base, the same wrapping, every stored tensor by hand
        from safetensors.torch import load_file

        fresh = load_base(str(tiny_model), device="cpu").model
        stored = load_file(tmp_path / f"{name}.st")
        if name == "replace":
            attach_replace(fresh, InfiniLayer(memory_config(fresh), d_ff=32))
        else:
            attach_parallel(fresh, memory_config(fresh))
        state = fresh.state_dict()
        for key, value in stored.items():
            state[key].copy_(value)
        with single_thread():
            again = _trained_logits(fresh, ids, 16)
        assert torch.equal(loaded, again), name


def test_eval_reversal_reads_the_adapter_model(run_cli, tiny_model, prepared_tiny, tmp_path):
    result = run_cli("train-infini-adapter", "--model", str(tiny_model), "--device", "cpu",
                     "--data", str(prepared_tiny), "--segment-length", "16",
                     "--segments-per-sequence", "2", "--max-train-tokens", "1200",
                     "--val-max-tokens", "100", "--reversal-repeats", "1", "--out", "a.st",
                     "--metrics", "a.json", cwd=tmp_path)
    assert result.code == 0, result.err
    result = run_cli("eval-reversal", "--model", str(tiny_model), "--device", "cpu",
                     "--model-kind", "infini-lm", "--checkpoint", "a.st",
                     "--metrics", "r.json", cwd=tmp_path)
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "r.json").read_text())
    assert metrics["model_kind"] == "infini-lm"
    assert metrics["injected_pairs"] == metrics["control_pairs"] == HALF
