"""Virtual tokens e* (build-e-star), the compressors (train-compressor) and their evaluation,
on the tiny fixture model; one test on the real default base."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import assert_one_line_error

from newllm.core.base import load_base
from newllm.virtual_tokens.e_star import (
    EStarConfig,
    first_mismatch,
    kl_rows,
    no_context_kl,
    optimize_batch,
    optimize_e_star,
    reconstruction_metrics,
    teacher_outputs,
    topk_kl_rows,
)

SEP = 0  # <|endoftext|> in the fixture tokenizer


@pytest.fixture(scope="session")
def taught_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after 150 AdamW steps on the fixture sentences (a few seconds).

    The random fixture cannot be steered through its inputs: its logits span well under a
    nat, its next-token distribution hardly depends on the context (no-context KL ~0.003)
    and no input vector makes it continue a text. Taught the sentences, it reads its
    context as a language model does, so compressing a context into e* means something.
    """
    from conftest import SENTENCES

    base = load_base(str(tiny_model), device="cpu")
    model = base.model.train().requires_grad_(True)
    rows = [torch.tensor([SEP] + base.tokenizer(s, add_special_tokens=False)["input_ids"])
            for s in SENTENCES]
    pad = base.tokenizer.pad_token_id
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    labels = ids.masked_fill(ids == pad, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5
    folder = tmp_path_factory.mktemp("taught-llama")
    model.eval().save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(taught_model: Path):
    return load_base(str(taught_model), device="cpu")


def ids_of(tiny, text: str) -> torch.Tensor:
    return torch.tensor(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])


def pair(tiny, text: str, follow: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ids_of(tiny, text), ids_of(tiny, follow)


def test_kl_rows_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    teacher = F.log_softmax(torch.randn(2, 3, 7, generator=g), dim=-1)
    student = torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    got = kl_rows(teacher, student, mask)
    p, q = teacher.exp(), F.softmax(student, dim=-1)
    direct = [sum((p[b, c] * (p[b, c] / q[b, c]).log()).sum() for c in range(3) if mask[b, c])
              / mask[b].sum() for b in range(2)]
    assert torch.allclose(got, torch.stack(direct), atol=1e-6)


def test_topk_kl_with_every_token_kept_is_the_full_kl():
    g = torch.Generator().manual_seed(1)
    teacher = F.log_softmax(torch.randn(2, 4, 9, generator=g), dim=-1)
    student = torch.randn(2, 4, 9, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    top = teacher.topk(9, dim=-1)
    assert torch.allclose(topk_kl_rows(student, top.values, top.indices, mask),
                          kl_rows(teacher, student, mask), atol=1e-5)
    # fewer kept tokens: a coarse-graining, so never more than the full KL
    top3 = teacher.topk(3, dim=-1)
    assert (topk_kl_rows(student, top3.values, top3.indices, mask)
            <= kl_rows(teacher, student, mask) + 1e-6).all()


def test_first_mismatch_is_the_greedy_match_length():
    predicted = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [5, 2, 3, 4]])
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    mask = torch.tensor([[True, True, True, False]] * 3)
    assert first_mismatch(predicted, target, mask).tolist() == [3, 1, 0]


def test_e_star_lowers_kl_well_below_no_context(tiny):
    text, follow = pair(tiny, "The river flows through the old city and reaches the sea",
                        " after many miles.")
    config = EStarConfig(num_virtual=2, steps=60, lr=0.1)
    result = optimize_batch(tiny.model, config, SEP, [text], [follow])
    teacher = teacher_outputs(tiny.model, SEP, [text], [follow], hidden_layer=None,
                              context_layer=None)
    baseline = no_context_kl(tiny.model, SEP, [follow], teacher)
    assert result.final_loss[0] < 0.5 * result.initial_loss[0]
    assert result.final_loss[0] < 0.5 * baseline[0]
    assert result.history[-1] < result.history[0]


def test_batched_equals_one_at_a_time_and_padding_changes_nothing(tiny):
    # different text and follow lengths: the batch pads both the teacher and the student rows
    pairs = [pair(tiny, "Bread is made from flour, water, salt", " and yeast."),
             pair(tiny, "The painter used bright colours to show light on water in the",
                  " morning, then went home to rest."),
             pair(tiny, "Birds migrate south", " in autumn and return north.")]
    texts, follows = [t for t, _ in pairs], [f for _, f in pairs]
    config = EStarConfig(num_virtual=2, steps=15, lr=0.05, hidden_weight=0.5,
                         hidden_loss_index=1, batch_size=3)
    batched = optimize_e_star(tiny.model, config, SEP, texts, follows)
    for i in range(3):
        alone = optimize_batch(tiny.model, config, SEP, texts[i:i + 1], follows[i:i + 1])
        assert torch.allclose(batched.e_star[i], alone.e_star[0], atol=1e-4), i
        assert torch.allclose(batched.final_loss[i], alone.final_loss[0], atol=1e-5), i


def test_reconstruct_reaches_exact_greedy_decoding(tiny):
    text = ids_of(tiny, "The library keeps thousands of books")[:6]
    config = EStarConfig(objective="reconstruct", num_virtual=1, steps=100, lr=0.1)
    result = optimize_batch(tiny.model, config, SEP, [text], None)
    accuracy, exact = reconstruction_metrics(tiny.model, SEP, result.e_star, [text])
    assert exact.item() == len(text) and accuracy.item() == 1.0
    # an independent check: greedy generation after [sep, e*] gives back the text
    from newllm.virtual_tokens.e_star import greedy_continuations
    generated = greedy_continuations(tiny.model, SEP, [result.e_star[0]], len(text))
    assert generated[0].tolist() == text.tolist()


@pytest.mark.parametrize("arch", ["hyper", "qattn"])
def test_both_archs_give_b_k_d_and_padding_is_ignored(arch):
    from newllm.virtual_tokens.compressor import Compressor, CompressorConfig

    torch.manual_seed(0)
    compressor = Compressor(CompressorConfig(arch, 24, 32, 3, num_heads=4, num_layers=2,
                                             ffn_dim=16)).eval()
    hidden = torch.randn(2, 5, 24)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = compressor(hidden, mask)
    assert out.shape == (2, 3, 32)
    # the second row's padding (garbage values included) never reaches its output
    alone = compressor(hidden[1:, :3], mask[1:, :3])
    assert torch.allclose(out[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("arch", ["hyper", "qattn"])
def test_kl_gradient_reaches_the_compressor_and_no_base_parameter(tiny, arch):
    from newllm.virtual_tokens.compressor import (
        Compressor,
        CompressorConfig,
        LossWeights,
        compressor_loss,
    )
    from newllm.virtual_tokens.e_star import EStarSet

    texts = [ids_of(tiny, "Bread is made from flour"), ids_of(tiny, "Birds migrate south")]
    follows = [ids_of(tiny, ", water, salt"), ids_of(tiny, " in autumn")]
    teacher = teacher_outputs(tiny.model, SEP, texts, follows, hidden_layer=1, context_layer=1)
    top = teacher.logp.topk(8, dim=-1)
    context = torch.nn.utils.rnn.pad_sequence(teacher.context_hidden, batch_first=True)
    mask = torch.arange(context.shape[1])[None] < torch.tensor([len(t) for t in texts])[:, None]
    data = EStarSet(torch.randn(2, 1, 32), torch.ones(2, dtype=torch.bool), torch.arange(2),
                    texts, follows, context, mask, top.values,
                    top.indices, teacher.hidden, torch.zeros(2), torch.zeros(2), {})
    compressor = Compressor(CompressorConfig(arch, 32, 32, 1, num_heads=4, ffn_dim=16))
    cpu = torch.device("cpu")
    # the KL term alone: the regression term's gradient would reach the compressor anyway
    kl_only = (compressor_loss(compressor, tiny.model, data, torch.arange(2), SEP,
                               LossWeights(kl_weight=1.0), None, cpu)
               - compressor_loss(compressor, tiny.model, data, torch.arange(2), SEP,
                                 LossWeights(kl_weight=0.0), None, cpu))
    assert kl_only.item() > 0
    kl_only.backward()
    assert compressor.queries.grad is not None and compressor.queries.grad.abs().sum() > 0
    assert compressor.out_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_pooled_attention_against_a_per_query_loop():
    from newllm.virtual_tokens.compressor import pooled_attention

    g = torch.Generator().manual_seed(0)
    batch, heads, total = 3, 2, 9
    causal = torch.ones(total, total).tril().bool()
    logits = torch.randn(batch, heads, total, total, generator=g).masked_fill(~causal, -1e9)
    probs = logits.softmax(dim=-1)
    prefix = torch.tensor([4, 2, 6])  # separator + context
    positions = torch.tensor([[3, 4, 5, 6], [1, 2, 3, 4], [5, 6, 7, 8]])
    pooled = pooled_attention(probs, prefix, positions)
    assert pooled.shape == (batch, heads, 4, 6)
    for b, h, c in itertools.product(range(batch), range(heads), range(4)):
        row = probs[b, h, positions[b, c]]
        start = int(prefix[b])
        want = [row[0], row[1:start].sum()] + [row[start + j] if start + j < total else 0.0
                                                for j in range(4)]
        assert torch.allclose(pooled[b, h, c], torch.tensor(want), atol=1e-6)
        assert pooled[b, h, c].sum().item() == pytest.approx(1.0, abs=1e-5)


class Fixed(torch.nn.Module):
    """A stand-in compressor that emits given vectors (plus a zero-initialised shift)."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.vectors = vectors
        self.shift = torch.nn.Parameter(torch.zeros(vectors.shape[-1]))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.vectors + self.shift


@pytest.mark.parametrize("use_weights", [False, True])
def test_attention_match_is_zero_when_the_student_reads_the_text_itself(tiny, use_weights):
    from newllm.virtual_tokens.compressor import (
        LossWeights,
        attention_targets,
        compressor_loss,
    )
    from newllm.virtual_tokens.e_star import EStarSet, embed

    # equal-length texts so that k = T: the "virtual tokens" are the text's own embeddings
    texts = [ids_of(tiny, "Bread is made from flour"), ids_of(tiny, "Birds migrate south")]
    texts = [t[:4] for t in texts]
    follows = [ids_of(tiny, ", water, salt"), ids_of(tiny, " in autumn")]
    with torch.no_grad():
        vectors = torch.stack([embed(tiny.model, t) for t in texts])  # [2, 4, d]
    layers = (0, 1)
    implementation = tiny.model.config._attn_implementation
    targets = attention_targets(tiny.model, SEP, texts, follows, layers, use_weights)
    assert tiny.model.config._attn_implementation == implementation  # restored
    width = max(len(f) for f in follows)
    assert targets.shape[:2] == (2, 2) and targets.shape[-2:] == (
        (width, 2 + width) if use_weights else (width, 32))
    context = torch.zeros(2, 4, 32)
    data = EStarSet(vectors, torch.ones(2, dtype=torch.bool), torch.arange(2), texts, follows,
                    context, torch.ones(2, 4, dtype=torch.bool),
                    torch.zeros(2, width, 1), torch.zeros(2, width, 1, dtype=torch.long), None,
                    torch.zeros(2), torch.zeros(2), {})
    weights = LossWeights(kl_weight=0.0, attn_weight=1.0, attn_layers=layers,
                          attn_use_weights=use_weights)
    cpu = torch.device("cpu")
    same = compressor_loss(Fixed(vectors), tiny.model, data, torch.arange(2), SEP, weights,
                           None, cpu, targets)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    # moved off the text, the student attends differently; the gradient reaches the
    # compressor and never the base
    moved = Fixed(vectors + 0.5 * torch.randn(vectors.shape, generator=torch.Generator()
                                              .manual_seed(0)))
    no_attention = compressor_loss(moved, tiny.model, data, torch.arange(2), SEP,
                                   LossWeights(kl_weight=0.0), None, cpu)
    attention = compressor_loss(moved, tiny.model, data, torch.arange(2), SEP, weights, None,
                                cpu, targets) - no_attention
    assert attention.item() > 1e-4
    attention.backward()
    assert moved.shift.grad is not None and moved.shift.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())


@pytest.mark.parametrize("use_weights", [False, True])
def test_attention_targets_do_not_depend_on_the_batching(tiny, use_weights):
    from newllm.virtual_tokens.compressor import attention_targets

    # follows of different lengths: a batch narrower than the widest is padded
    texts = [ids_of(tiny, "Bread is made from flour"), ids_of(tiny, "Birds migrate south"),
             ids_of(tiny, "The river flows")]
    follows = [ids_of(tiny, ", water"), ids_of(tiny, " in autumn and spring"),
               ids_of(tiny, " to the sea")]
    assert len({len(f) for f in follows}) == 3
    together = attention_targets(tiny.model, SEP, texts, follows, (0, 1), use_weights)
    alone = attention_targets(tiny.model, SEP, texts, follows, (0, 1), use_weights,
                              batch_size=1)
    assert together.shape == alone.shape
    assert torch.allclose(together, alone, atol=1e-5)
    # a row's padding (positions past its follow, and with weights their bins) stays zero
    short = len(follows[0])
    assert together[0, :, ..., short:, :].abs().max() == 0
    assert together[0].abs().sum() > 0


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_stages_end_to_end_on_the_taught_model(run_cli, taught_model, prepared_tiny, tmp_path):
    model = str(taught_model)
    common = ("--model", model, "--device", "cpu")
    result = run_cli("build-e-star", *common, "--data", str(prepared_tiny), "--num-virtual",
                     "2", "--steps", "40", "--lr", "0.1", "--num-samples", "6",
                     "--e-star-samples", "4", "--val-samples", "3", "--text-tokens", "16",
                     "--follow-tokens", "6",
                     "--hidden-loss-index", "1", "--context-hidden-index", "1",
                     "--teacher-topk", "16", "--batch-size", "4", cwd=tmp_path)
    assert result.code == 0, result.err
    build = read_json(tmp_path / "metrics/e_star/build.json")
    assert build["train_pairs"] == 6 and build["val_pairs"] == 3
    assert build["train_e_star_pairs"] == 4 and build["val_e_star_pairs"] == 3
    assert build["val_final_kl"] < 0.5 * build["val_no_context_kl"]
    from newllm.core.artifacts import load_artifact

    e_star = load_artifact(tmp_path / "artifacts/e_star/val.safetensors",
                           kind="virtual-token-e-star")
    assert e_star["e_star"].shape == (3, 2, 32)
    assert e_star["context_hidden"].shape == (3, 16, 32)
    assert e_star["teacher_topk_logp"].shape == (3, 6, 16)
    assert e_star["has_e_star"].all()
    # held-out pairs come from val documents only
    assert e_star.meta["extra"]["split"] == "val"
    train_set = load_artifact(tmp_path / "artifacts/e_star/train.safetensors",
                              kind="virtual-token-e-star")
    has = train_set["has_e_star"].bool()
    assert int(has.sum()) == 4 and train_set["teacher_topk_logp"].shape[0] == 6
    # the pairs without an e* have zero vectors and no final KL (not a made-up one)
    assert (train_set["e_star"][~has] == 0).all() and train_set["final_kl"][~has].isnan().all()
    assert (train_set["e_star"][has].norm(dim=-1) > 0).all()

    # the runs of compressor_runs (as dvc.yaml's foreach runs them: `--run NAME --name NAME`),
    # each trying another setting here: plain hyper; qattn matching attention weights;
    # hyper_attn matching attention outputs (layers 0 and last); eval-compressor reads the
    # same run names
    runs = {"hyper": {"arch": "hyper", "attn_weight": 0.0, "attn_use_weights": False},
            "qattn": {"arch": "qattn", "attn_weight": 0.5, "attn_use_weights": True},
            "hyper_attn": {"arch": "hyper", "attn_weight": 0.5, "attn_use_weights": False},
            "hyper_s1": {"arch": "hyper", "attn_weight": 0.0, "attn_use_weights": False,
                         "seed": 1},
            "hyper_k3": {"arch": "hyper", "attn_weight": 0.0, "attn_use_weights": False,
                         "num_virtual": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"compressor_runs": runs}))
    for run, keys in runs.items():
        result = run_cli("train-compressor", *common, "--run", run, "--name", run,
                         "--num-heads", "4", "--hyper-ffn-dim", "32", "--epochs", "3",
                         "--batch-size", "4", "--lr", "0.001", "--hidden-weight", "0.1",
                         "--hidden-loss-index", "1", "--attn-decoder-layers", "[0, -1]",
                         cwd=tmp_path)
        assert result.code == 0, result.err
        trained = read_json(tmp_path / f"metrics/compressor/{run}.json")
        assert trained["base_weights_unchanged"] is True and trained["arch"] == keys["arch"]
        assert trained["attn_weight"] == keys["attn_weight"]
        assert (tmp_path / f"plots/compressor/{run}.csv").is_file()
        assert (tmp_path / f"artifacts/compressors/{run}/compressor.safetensors").is_file()
        # regression where an e* of the compressor's k exists (4 training pairs), else none
        assert trained["train_pairs"] == 6
        assert trained["regression_pairs"] == (0 if run == "hyper_k3" else 4)
        assert ("val_cosine" in trained) == (run != "hyper_k3")
    result = run_cli("train-compressor", *common, "--num-virtual", "3", "--kl-weight", "0",
                     "--out-dir", "bad", "--metrics-dir", "bad_metrics", cwd=tmp_path)
    assert_one_line_error(result, "train_compressor.num_virtual 3 differs from the e* set's 2, "
                                  "so there is no regression target")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad_metrics").exists()
    result = run_cli("train-compressor", *common, "--arch", "hyper", "--num-heads", "4",
                     "--attn-weight", "0.5", "--attn-decoder-layers", "[0, 2]", "--out-dir",
                     "bad", "--metrics-dir", "bad_metrics", cwd=tmp_path)
    assert_one_line_error(result, "train_compressor.attn_decoder_layers must hold decoder "
                                  "layer indices in [-2, 1]")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad_metrics").exists()

    result = run_cli("eval-compressor", *common, "--greedy-tokens", "4", cwd=tmp_path)
    assert result.code == 0, result.err
    ev = read_json(tmp_path / "metrics/e_star/eval.json")
    assert ev["full_text_kl"] < 1e-5 and ev["full_text_top1"] == 1.0
    assert ev["full_text_greedy_len"] == 4
    assert ev["e_star_kl"] < ev["no_context_kl"]
    assert abs(ev["e_star_kl"] - ev["e_star_stored_kl"]) < 1e-3
    assert ev["compression_ratio"] == 8.0
    for run in runs:
        assert ev[f"{run}_amortization_gap"] == pytest.approx(ev[f"{run}_kl"]
                                                              - ev["e_star_kl"], abs=1e-6)
        for control in ("shuffled", "mean_output"):
            assert ev[f"{run}_minus_{control}_kl"] == pytest.approx(
                ev[f"{run}_kl"] - ev[f"{run}_{control}_kl"], abs=1e-6)
        for control in ("mean_e_star", "norm_matched"):
            assert ev[f"{run}_minus_{control}_kl"] == pytest.approx(
                ev[f"{run}_kl"] - ev[f"{control}_kl"], abs=1e-6)
        lo, hi = ev[f"{run}_minus_shuffled_kl_lo"], ev[f"{run}_minus_shuffled_kl_hi"]
        assert lo <= ev[f"{run}_minus_shuffled_kl"] <= hi
    assert ev["hyper_k3_num_virtual"] == 3 and ev["hyper_k3_compression_ratio"] == 16 / 3
    assert "hyper_k3_cosine" not in ev and "hyper_cosine" in ev  # vectors vs e* of one k only
    # hyper and hyper_s1 differ only in their seed: summarised over seeds
    assert ev["hyper_over_seeds_kl_n"] == 2
    assert ev["hyper_over_seeds_kl_mean"] == pytest.approx(
        (ev["hyper_kl"] + ev["hyper_s1_kl"]) / 2)
    # the oracle reading another pair's e* is worse than its own on this model
    assert ev["e_star_shuffled_kl"] > ev["e_star_kl"]
    for variant in ("no_context", "e_star", "e_star_shuffled", "norm_matched", "random"):
        assert ev[f"{variant}_kl_lo"] <= ev[f"{variant}_kl"] <= ev[f"{variant}_kl_hi"]
    # the control: one vector set for every pair, the mean of the training e*
    assert ev["mean_e_star_mse"] > 0 and ev["mean_e_star_kl"] > ev["e_star_kl"]
    assert ev["norm_matched_rel_norm_err"] < ev["mean_e_star_rel_norm_err"]
    nearest = read_json(tmp_path / "metrics/e_star/nearest.json")["examples"]
    assert len(nearest) == 3 and len(nearest[0]["e_star"]) == 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"compressor_runs": {
        "hyper": runs["hyper"], "e_star": runs["hyper"]}}))
    result = run_cli("--params", "bad.yaml", "eval-compressor", *common, "--metrics",
                     "bad.json", cwd=tmp_path)
    assert_one_line_error(result, "compressor_runs: a run may not be named e_star")
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"compressor_runs": {}}))
    result = run_cli("--params", "bad.yaml", "eval-compressor", *common, "--metrics",
                     "bad.json", cwd=tmp_path)
    assert_one_line_error(result, "bad.yaml: expected params group 'compressor_runs'")
    assert not (tmp_path / "bad.json").exists()

    result = run_cli("reconstruct-capacity", *common, "--data", str(prepared_tiny),
                     "--num-virtual-list", "[2, 1, 2]", "--lengths", "[2, 4]",
                     "--texts-per-length", "2", "--max-steps", "100", "--lr", "0.1",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    capacity = read_json(tmp_path / "metrics/e_star/capacity.json")
    assert {"capacity_k1", "capacity_k2"} <= set(capacity)  # sorted, distinct
    for k, n in itertools.product((1, 2), (2, 4)):
        share = capacity[f"k{k}_len{n}_exact"]
        assert capacity[f"k{k}_len{n}_failures"] == round(2 * (1 - share))
        assert capacity[f"k{k}_len{n}_exact_lo"] <= share <= capacity[f"k{k}_len{n}_exact_hi"]
    curve = (tmp_path / "plots/e_star/capacity.csv").read_text().splitlines()
    assert len(curve) == 1 + 2 * 2 * 2  # one row per k, length and text
    result = run_cli("reconstruct-capacity", *common, "--lengths", "[]", "--metrics", "bad.json",
                     cwd=tmp_path)
    assert_one_line_error(result, "reconstruct_capacity.lengths is empty")
    result = run_cli("reconstruct-capacity", *common, "--lengths", "[4, 0]", "--metrics",
                     "bad.json", cwd=tmp_path)
    assert_one_line_error(result, "reconstruct_capacity.lengths must be a list of integers >= 1")
    assert not (tmp_path / "bad.json").exists()

    result = run_cli("demo-compressor", *common, "--compressor",
                     "artifacts/compressors/qattn/compressor.safetensors", "--text",
                     SENTENCES_0, "--prompt", "The river", "--max-new-tokens", "4",
                     cwd=tmp_path)
    assert result.code == 0, result.err
    assert "[no context]" in result.out and "[full text]" in result.out
    assert "[compressed (2 vectors)]" in result.out


SENTENCES_0 = "The river flows through the old city and reaches the sea after many miles."


def test_bench_e_star_matches_one_at_a_time(run_cli, tiny_model, prepared_tiny, tmp_path):
    import re

    result = run_cli("bench", "e-star", "--model", str(tiny_model), "--device", "cpu",
                     "--data", str(prepared_tiny), "--pairs", "4", "--steps", "3",
                     "--text-tokens", "8", "--follow-tokens", "4", cwd=tmp_path)
    assert result.code == 0, result.err
    lines = result.out.strip().splitlines()
    assert re.fullmatch(r"e-star speedup: [0-9.]+x", lines[-1]), result.out
    diff = float(re.search(r"max \|final KL difference\| ([0-9.e+-]+)", result.out)[1])
    assert diff < 1e-4, result.out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real_model
def test_real_default_base_e_star_beats_no_context(real_assets):
    base = load_base(str(real_assets / "smollm2-135m"), device="cpu")
    from newllm.core.tokens import separator_token_id

    sep = separator_token_id(base.tokenizer)
    docs = [("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
             "France. It is named after the engineer", " Gustave Eiffel, whose company"),
            ("Photosynthesis is the process by which green plants use sunlight to make",
             " food from carbon dioxide and water."),
            ("The Pacific Ocean is the largest and deepest of Earth's five oceanic",
             " divisions. It extends from the Arctic")]
    texts = [ids_of(base, t) for t, _ in docs]
    follows = [ids_of(base, f) for _, f in docs]
    result = optimize_e_star(base.model, EStarConfig(steps=8, lr=0.1, batch_size=3), sep,
                             texts, follows)
    teacher = teacher_outputs(base.model, sep, texts, follows, hidden_layer=None,
                              context_layer=None)
    baseline = no_context_kl(base.model, sep, follows, teacher)
    assert (result.final_loss < baseline).all(), (result.final_loss, baseline)
    assert result.final_loss.mean() < 0.8 * baseline.mean()


def plain_adam(tiny, text: torch.Tensor, k: int, lr: float, steps: int) -> torch.Tensor:
    """The reference: one text crammed alone, a plain Adam loop at a constant lr, the whole
    model run on `[sep, vectors, text]` (position k, the last virtual one, predicts text[0])."""
    table = tiny.model.get_input_embeddings()
    vectors = table.weight.detach().mean(dim=0).repeat(k, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=lr)
    for _ in range(steps):
        embeds = torch.cat([table(torch.tensor([SEP])), vectors, table(text.long())])
        logits = tiny.model(inputs_embeds=embeds[None]).logits[0, k:k + len(text)]
        loss = F.cross_entropy(logits, text.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vectors.detach()


def test_early_stopping_keeps_exact_rows_frozen_and_stops_the_others(tiny):
    from newllm.virtual_tokens.e_star import reconstruct_until_exact

    texts = [ids_of(tiny, s)[:n] for s, n in ((SENTENCES_0, 3), (SENTENCES_0, 12),
                                               ("Mathematics studies numbers, shapes and "
                                                "the patterns that connect them.", 8))]
    config = EStarConfig("reconstruct", 1, 60, 0.05)
    result = reconstruct_until_exact(tiny.model, config, SEP, texts, max_steps=60)
    assert result.exact.any() and not result.exact.all(), result  # a mix, so both paths run
    for i, text in enumerate(texts):
        # every row's e* is the one a plain Adam loop gives it alone after its own steps:
        # rows that became exact stopped there, whatever the others did afterwards
        alone = plain_adam(tiny, text, 1, 0.05, int(result.steps[i]))
        assert torch.allclose(result.e_star[i], alone, atol=1e-4), i
        if result.exact[i]:
            assert result.steps[i] < 60 and result.exact_len[i] == len(text)
            # one step earlier it was not yet exact (it stopped at the first exact step)
            if result.steps[i] > 0:
                _, earlier = reconstruction_metrics(
                    tiny.model, SEP, plain_adam(tiny, text, 1, 0.05,
                                                int(result.steps[i]) - 1)[None], [text])
                assert earlier[0] < len(text)
        else:
            assert result.steps[i] == 60 and result.exact_len[i] < len(text)
    # a larger cap changes nothing for the rows that were exact: their vectors are frozen
    longer = reconstruct_until_exact(tiny.model, config, SEP, texts, max_steps=90)
    for i in result.exact.nonzero().flatten().tolist():
        assert torch.allclose(longer.e_star[i], result.e_star[i], atol=1e-5)
        assert longer.steps[i] == result.steps[i]


def test_kl_alone_on_pairs_without_e_star_lowers_the_held_out_kl(tiny):
    """train-compressor's loss with no e* for any pair (and another k than e* would have):
    the KL term alone trains the compressor, and the held-out KL goes down."""
    from conftest import SENTENCES

    from newllm.core.train import TrainConfig, Trainer
    from newllm.virtual_tokens.compressor import (
        Compressor,
        CompressorConfig,
        LossWeights,
        compressor_loss,
    )
    from newllm.virtual_tokens.e_star import EStarSet, pad_ids

    def pairs_set(sentences: list[str]) -> EStarSet:
        texts = [ids_of(tiny, s)[:8] for s in sentences]
        follows = [ids_of(tiny, s)[8:13] for s in sentences]
        teacher = teacher_outputs(tiny.model, SEP, texts, follows, hidden_layer=None,
                                  context_layer=1)
        top = teacher.logp.topk(16, dim=-1)
        context = torch.nn.utils.rnn.pad_sequence(teacher.context_hidden, batch_first=True)
        n = len(texts)
        return EStarSet(torch.zeros(n, 1, 32), torch.zeros(n, dtype=torch.bool),
                        torch.arange(n), texts, follows, context,
                        torch.ones(n, context.shape[1], dtype=torch.bool), top.values,
                        top.indices, None, torch.full((n,), float("nan")), torch.zeros(n), {})

    train, held_out = pairs_set(SENTENCES[:12]), pairs_set(SENTENCES[12:16])
    assert pad_ids(train.texts)[0].shape == (12, 8)
    torch.manual_seed(0)
    compressor = Compressor(CompressorConfig("hyper", 32, 32, num_virtual=2, num_heads=4,
                                             num_layers=1, ffn_dim=32))
    weights = LossWeights(kl_weight=1.0)
    rows = torch.arange(4)

    def held_out_kl() -> float:
        with torch.no_grad():
            return compressor_loss(compressor, tiny.model, held_out, rows, SEP, weights, None,
                                   torch.device("cpu")).item()

    before = held_out_kl()
    trainer = Trainer(TrainConfig("train_compressor", epochs=30, batch_size=4, lr=3e-3))
    history = trainer.fit(compressor, lambda m, r: compressor_loss(
        m, tiny.model, train, r, SEP, weights, None, torch.device("cpu")), 12,
        torch.Generator().manual_seed(0))
    assert history[-1].train_loss < history[0].train_loss
    assert held_out_kl() < 0.9 * before, (before, held_out_kl())


def test_more_pairs_with_e_star_than_training_pairs_is_refused(run_cli, tiny_model, tmp_path):
    result = run_cli("build-e-star", "--model", str(tiny_model), "--device", "cpu",
                     "--num-samples", "4", "--e-star-samples", "5", cwd=tmp_path)
    assert_one_line_error(result, "build_e_star.e_star_samples (5) must not exceed "
                                  "num_samples (4)")
    result = run_cli("build-e-star", "--model", str(tiny_model), "--device", "cpu",
                     "--val-samples", "1", cwd=tmp_path)
    assert_one_line_error(result, "build_e_star.val_samples")  # a derangement needs 2 pairs
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real_model
def test_real_default_base_crams_a_sentence_into_one_vector(real_assets):
    """The capacity curve's positive control: on the real base one vector holds a 12-token
    sentence exactly (the first token included) well within the default step cap, at the
    default learning rate, and stops there."""
    from newllm.core.tokens import separator_token_id
    from newllm.virtual_tokens.e_star import reconstruct_until_exact

    base = load_base(str(real_assets / "smollm2-135m"), device="cpu")
    sep = separator_token_id(base.tokenizer)
    text = ids_of(base, "Photosynthesis is the process by which green plants use sunlight "
                        "to make food")[:12]
    config = EStarConfig("reconstruct", 1, 400, 0.01)
    result = reconstruct_until_exact(base.model, config, sep, [text], max_steps=400)
    assert bool(result.exact[0]) and result.exact_len[0] == 12, result
    assert 0 < int(result.steps[0]) < 400
