"""Fixtures: a tiny random Llama with a real (trained byte-level BPE) tokenizer, a small
wiki-format corpus, and the real default model fetched once per test session."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from newllm.core.cli import main

SENTENCES = [
    "The river flows through the old city and reaches the sea after many miles.",
    "Mathematics studies numbers, shapes and the patterns that connect them.",
    "In 1905 the physicist published four papers that changed modern science.",
    "The painter used bright colours to show light on water in the morning.",
    "Bread is made from flour, water, salt and yeast, then baked in an oven.",
    "The mountain range separates two countries and holds several glaciers.",
    "A language model assigns a probability to every sequence of words.",
    "The library keeps thousands of books, maps and handwritten letters.",
    "Birds migrate south in autumn and return north when the days grow longer.",
    "The committee voted to build a new bridge across the harbour.",
    "Electric current is the flow of charge through a conductor such as copper.",
    "The festival celebrates the harvest with music, dancing and shared meals.",
    "Ancient astronomers recorded the motion of planets against the stars.",
    "The company moved its headquarters to a larger building downtown.",
    "Rain forests are home to more than half of the species on land.",
    "She wrote a novel about a family that lived beside a lighthouse.",
]


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests keep their weight-hash cache to themselves, not the user's ~/.cache/newllm."""
    folder = tmp_path_factory.mktemp("newllm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEWLLM_CACHE_DIR", str(folder))
        yield folder


def make_corpus_texts(n_docs: int = 40, seed: int = 0) -> dict[str, dict[str, str]]:
    rng = random.Random(seed)
    return {f"Article {i:03d}": {"title": f"Article {i:03d}",
                                 "extract": " ".join(rng.sample(SENTENCES, rng.randint(2, 6)))}
            for i in range(n_docs)}


def build_tiny_model(folder: Path, seed: int = 0, vocab_size: int = 400) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer trained on SENTENCES."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|bos|>", pad_token="<|pad|>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, another tokenizer and weights: for provenance mismatches."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-other"), seed=1, vocab_size=350)


@pytest.fixture(scope="session")
def mini_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "summaries_en-us.json"
    path.write_text(json.dumps(make_corpus_texts()))
    return path


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run `newllm ARGS...` in-process from a folder; returns exit code, stdout, stderr."""

    def run(*args: str, cwd: Path | None = None) -> CliResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def prepared_tiny(tiny_model: Path, mini_corpus: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Path:
    """The mini corpus prepared with the tiny model's tokenizer."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)
        try:
            main(["prepare-data", "--model", str(tiny_model), "--corpus", str(mini_corpus),
                  "--val-fraction", "0.2", "--test-fraction", "0.1", "--out", str(out),
                  "--metrics", str(out.parent / "prepare.json")])
        except SystemExit as exc:
            assert exc.code == 0
    return out


def assert_one_line_error(result: CliResult, *needles: str) -> None:
    """Bad input: non-zero exit, one line on stderr naming what was wrong, no traceback."""
    assert result.code != 0
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_assets() -> Path:
    """The embedded defaults, fetched once: data/assets if `dvc repro` made them, else a cache."""
    from newllm.foundation.assets import ASSETS, fetch_asset

    candidates = [Path(os.environ["NEWLLM_TEST_ASSETS"])] if "NEWLLM_TEST_ASSETS" in os.environ \
        else [REPO / "data" / "assets", Path.home() / ".cache" / "newllm" / "assets"]
    for folder in candidates:
        if all((folder / a.name / "newllm_asset.json").exists() for a in ASSETS):
            return folder
    folder = candidates[-1]
    for asset in ASSETS:
        fetch_asset(asset, folder)
    return folder
