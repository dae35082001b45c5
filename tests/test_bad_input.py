"""Bad input, stage by stage, as one table: each row is a command, a setup that writes the bad
file, and what the one-line error must say.

Every row must end with exit status 2, exactly one stderr line starting `error: `, no
traceback, and nothing written: the folder the command runs in holds exactly what the
setup put there (no output, no half-written temporary file).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from safetensors.torch import save_file

from newllm.core.cli import main

Setup = Callable[[Path, dict[str, Path]], None]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # "{model}", "{other}", "{corpus}", "{foreign}" are filled in
    setup: Setup | None
    needles: tuple[str, ...]
    marks: tuple = field(default=())


# --- setups: each writes one bad input into the folder the command runs in -----------------

def write(relative: str, content: str | bytes) -> Setup:
    def setup(cwd: Path, _env: dict[str, Path]) -> None:
        path = cwd / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return setup


def writes(*files: tuple[str, str]) -> Setup:
    """Several files, as `write` writes one."""
    def setup(cwd: Path, env: dict[str, Path]) -> None:
        for relative, content in files:
            write(relative, content)(cwd, env)
    return setup


def prepared(mutate: Callable[[Path], None] | None = None) -> Setup:
    """A copy of the tiny prepared data in `prepared/`, then `mutate(prepared)`."""
    def setup(cwd: Path, env: dict[str, Path]) -> None:
        shutil.copytree(env["prepared"], cwd / "prepared")
        if mutate is not None:
            mutate(cwd / "prepared")
    return setup


def drop_last_line(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")


def break_line_2(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1][:-5]  # cut the closing of the object
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def copy_from_foreign(source: str, target: str) -> Setup:
    """Copy a file made with the other tiny model (pairs, converter) to `target`."""
    def setup(cwd: Path, env: dict[str, Path]) -> None:
        (cwd / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(env["foreign"] / source, cwd / target)
    return setup


def foreign_e_star(cwd: Path, _env: dict[str, Path]) -> None:
    """An e* set recorded as made with another base model (weights and tokenizer)."""
    from newllm.core.artifacts import save_artifact

    save_artifact(cwd / "es" / "train.safetensors", {"e_star": torch.zeros(1, 1, 32)},
                  kind="virtual-token-e-star", stage="build-e-star", params={},
                  base={"model_id": "another-model", "weights_hash": "0" * 64,
                        "tokenizer_hash": "1" * 64},
                  extra={"objective": "continue"})


def safetensors_without_metadata(relative: str) -> Setup:
    def setup(cwd: Path, _env: dict[str, Path]) -> None:
        (cwd / relative).parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(2)}, str(cwd / relative))
    return setup


def dataset_with_column(name: str) -> Setup:
    def setup(cwd: Path, _env: dict[str, Path]) -> None:
        from datasets import Dataset

        Dataset.from_dict({name: ["one text", "two texts", "three texts"]}).save_to_disk(
            str(cwd / "ds"))
    return setup


def converter_metrics(files: dict[str, object]) -> Setup:
    """`cm/<name>.json` for each entry: a dict is dumped, a str/bytes written as is."""
    def setup(cwd: Path, _env: dict[str, Path]) -> None:
        (cwd / "cm").mkdir()
        for name, content in files.items():
            path = cwd / "cm" / f"{name}.json"
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content if isinstance(content, str) else json.dumps(content))
    return setup


def report_metrics(topk: int = 3, drop: str | None = None) -> dict[str, object]:
    """A train-converter metrics file as converter-report reads it (less key `drop`)."""
    metrics: dict[str, object] = {"topk": topk}
    for prefix in ("val", "identity"):
        for stat in ("mse", "cosine", "top1", f"top{topk}"):
            metrics[f"{prefix}_{stat}"] = 0.5
    metrics.pop(drop, None)
    return metrics


def lamp2(questions: list, golds: list) -> Setup:
    """A LaMP-2 questions file and its outputs file beside it."""
    def setup(cwd: Path, _env: dict[str, Path]) -> None:
        (cwd / "dev_questions.json").write_text(json.dumps(questions))
        (cwd / "dev_outputs.json").write_text(json.dumps({"golds": golds}))
    return setup


def lamp2_question(profile: list) -> dict:
    return {"id": "7", "input": "Which tag? tags: [comedy, classic] description: A film.",
            "profile": profile}


def foreign_directions(cwd: Path, env: dict[str, Path]) -> None:
    """Chameleon directions made with the other tiny model, as dir.safetensors."""
    shutil.copy(env["chameleon_foreign"] / "dir.safetensors", cwd / "dir.safetensors")
def cvfp_blocks(cwd: Path, env: dict[str, Path]) -> None:
    """The tiny prepared data and phase-1 blocks made from it (`blocks.safetensors`)."""
    shutil.copytree(env["prepared"], cwd / "prepared")
    with pytest.raises(SystemExit) as exit_info:
        main(["phase1-context", "--model", str(env["model"]), "--data", str(cwd / "prepared"),
              "--context-dim", "4", "--tokens-per-block", "50", "--val-tokens", "20",
              "--max-iterations", "1", "--lipschitz-samples", "2",
              "--out", str(cwd / "blocks.safetensors"), "--metrics", str(cwd / "p1.json"),
              "--plots", str(cwd / "p1.csv")])
    assert exit_info.value.code == 0


# --- commands ---------------------------------------------------------------------------------

PREPARE = ("prepare-data", "--model", "{model}", "--out", "prepared", "--metrics", "m.json")
EVAL = ("eval-ppl", "--model", "{model}", "--data", "prepared", "--context-length", "16",
        "--stride", "8", "--metrics", "ppl.json")
EXTRACT = ("extract-pairs", "--model", "{model}", "--max-tokens", "20", "--out-dir", "pairs",
           "--metrics-dir", "pm")
TRAIN = ("train-converter", "--model", "{model}", "--pairs-dir", "pairs", "--epochs", "1",
         "--out-dir", "conv", "--metrics-dir", "cm", "--plots-dir", "cp")
REPORT = ("converter-report", "--converters", "cm", "--layers", "[1, 2]", "--model-types",
          "[linear, mlp]", "--metrics", "report.json", "--plot", "by_layer.csv")
DEMO = ("demo-recursive", "--model", "{model}", "--converter", "conv.safetensors",
        "--max-new-tokens", "2")
TRAIN_LM = ("train-lm", "--model", "{model}", "--data", "prepared", "--d-model", "8",
            "--n-heads", "2", "--max-train-tokens", "512", "--out", "lm/model.safetensors",
            "--metrics", "tl.json", "--plot", "tl.csv")
REVERSAL = ("eval-reversal", "--model", "{model}", "--metrics", "rev.json")
MEMORY = ("eval-memory", "--model", "{model}", "--checkpoint", "lm.safetensors", "--data",
          "prepared", "--metrics", "mem.json", "--plot", "mem.csv")
ADAPTER = ("train-infini-adapter", "--model", "{model}", "--data", "prepared",
           "--segment-length", "16", "--segments-per-sequence", "2", "--max-train-tokens",
           "400", "--val-max-tokens", "100", "--reversal-facts", "null", "--out",
           "ad.safetensors", "--metrics", "ad.json")
INFINI_REPORT = ("infini-report", "--metrics-dir", "im", "--base-ppl", "ppl.json",
                 "--metrics", "ir.json")
SELFGEN = ("self-generate", "--model", "{model}", "--out", "gen.safetensors", "--metrics",
           "sg.json")
ESTIMATE = ("estimate-directions", "--model", "{model}", "--generations", "gen.safetensors",
            "--out", "dir.safetensors", "--metrics", "ed.json")
EVALCHAM = ("eval-chameleon", "--model", "{model}", "--directions", "dir.safetensors",
            "--metrics", "ev.json", "--data", "dev_questions.json")
PHASE1 = ("phase1-context", "--model", "{model}", "--data", "prepared", "--context-dim", "4",
          "--tokens-per-block", "50", "--out", "b.safetensors", "--metrics", "p1.json",
          "--plots", "p1.csv")
PREP = ("phase2-prep-cache", "--model", "{model}", "--data", "prepared", "--blocks",
        "blocks.safetensors", "--train-tokens", "60", "--out", "cache", "--metrics", "pc.json")
PHASE2 = ("phase2-token", "--model", "{model}", "--blocks", "blocks.safetensors", "--cache",
          "cache", "--max-train-tokens", "40", "--max-val-tokens", "20", "--out",
          "lm.safetensors", "--metrics", "p2.json", "--plots", "p2.csv")
E_STAR = ("build-e-star", "--model", "{model}", "--data", "prepared", "--text-tokens", "8",
          "--num-samples", "2", "--e-star-samples", "1", "--val-samples", "2", "--steps", "1",
          "--out-dir", "es", "--metrics", "es.json", "--plot", "es.csv")
COMPRESSOR = ("train-compressor", "--model", "{model}", "--e-star-dir", "es", "--epochs", "1",
              "--out-dir", "cz", "--metrics-dir", "czm", "--plots-dir", "czp")
WIKI = "summaries_en-us.json"
NOT_UTF8 = "Caf\xe9 au lait in Paris.\n\nA second paragraph here.\n".encode("latin-1")

CASES = [
    # params: the file, its shape, unknown keys, types, ranges, consistency
    Case("params-file-missing", ("--params", "nope.yaml", "eval-ppl"), None,
         ("--params nope.yaml", "no such file")),
    Case("params-not-yaml", ("eval-ppl",), write("params.yaml", "eval_ppl: [1,\n"),
         ("params.yaml", "not valid YAML")),
    Case("params-not-a-mapping", ("eval-ppl",), write("params.yaml", "- eval_ppl\n- base\n"),
         ("params.yaml", "expected a mapping of parameter groups")),
    Case("params-group-not-a-mapping", ("eval-ppl",), write("params.yaml", "eval_ppl: 3\n"),
         ("params.yaml", "group 'eval_ppl' must be a mapping")),
    Case("params-unknown-key", ("eval-ppl",), write("params.yaml", "eval_ppl:\n  strid: 8\n"),
         ("params.yaml", "eval_ppl.strid is not a known parameter")),
    Case("params-wrong-type", ("eval-ppl",), write("params.yaml", "eval_ppl:\n  stride: eight\n"),
         ("params.yaml", "eval_ppl.stride must be an integer", "'eight'")),
    Case("params-out-of-range", ("eval-ppl",), write("params.yaml", "eval_ppl:\n  stride: 0\n"),
         ("params.yaml", "eval_ppl.stride must be an integer >= 1")),
    Case("params-bad-choice", ("eval-ppl",), write("params.yaml", "eval_ppl:\n  split: dev\n"),
         ("params.yaml", "eval_ppl.split must be one of")),
    Case("params-base-dtype", ("eval-ppl",), write("params.yaml", "base:\n  dtype: 16\n"),
         ("params.yaml", "base.dtype must be one of")),
    Case("params-stride-over-context", ("eval-ppl",),
         write("params.yaml", "eval_ppl:\n  context_length: 8\n  stride: 16\n"),
         ("eval_ppl.stride (16)", "eval_ppl.context_length (8)")),
    Case("params-list-of-ints", ("converter-report",),
         write("params.yaml", "per_layer:\n  layers: [1, x]\n"),
         ("params.yaml", "per_layer.layers must be a list of integers")),
    Case("params-fetch-assets-unknown-key", ("fetch-assets",),
         write("params.yaml", "fetch_assets:\n  mirror: x\n"),
         ("fetch_assets.mirror is not a known parameter",)),
    Case("option-out-of-range", ("eval-ppl", "--stride", "0"), None,
         ("--stride", "eval_ppl.stride")),
    # the base model
    Case("model-unknown-path", (*PREPARE[:2], "no-such-model", *PREPARE[3:], "--corpus",
                                "{corpus}"), None, ("base.model", "no-such-model")),
    Case("model-folder-without-config", (*PREPARE[:2], "empty-model", *PREPARE[3:],
                                         "--corpus", "{corpus}"),
         write("empty-model/README", "not a model"), ("empty-model", "config.json")),
    # prepare-data: the corpus
    Case("corpus-missing", (*PREPARE, "--corpus", "nothing"), None,
         ("prepare_data.corpus 'nothing' does not exist",)),
    Case("corpus-empty", (*PREPARE, "--corpus", "corpus"), write("corpus/empty.txt", "\n\n  \n"),
         ("corpus", "contains no documents")),
    Case("corpus-too-few-documents", (*PREPARE, "--corpus", "c.txt"),
         write("c.txt", "One paragraph.\n\nAnother paragraph.\n"),
         ("2 document(s)", "at least 3")),
    Case("corpus-fractions-leave-no-train", (*PREPARE, "--corpus", "c.txt", "--val-fraction",
                                             "0.5", "--test-fraction", "0.5"),
         write("c.txt", "One.\n\nTwo.\n\nThree.\n\nFour.\n"),
         ("val_fraction + test_fraction leave no training documents",)),
    Case("corpus-jsonl-bad-line", (*PREPARE, "--corpus", "c.jsonl"),
         write("c.jsonl", '{"text": "one"}\n{"text": "two"\n{"text": "three"}\n'),
         ("c.jsonl:2: not valid JSON",)),
    Case("corpus-jsonl-no-text-field", (*PREPARE, "--corpus", "c.jsonl"),
         write("c.jsonl", '{"text": "one"}\n{"body": "two"}\n'),
         ('c.jsonl:2: has no "text" field', "prepare_data.text_field")),
    Case("corpus-jsonl-not-an-object", (*PREPARE, "--corpus", "c.jsonl"),
         write("c.jsonl", '["one"]\n'), ("c.jsonl:1: expected a JSON object",)),
    Case("corpus-jsonl-text-not-a-string", (*PREPARE, "--corpus", "c.jsonl"),
         write("c.jsonl", '{"text": 3}\n'), ('c.jsonl:1: "text" is a int',)),
    Case("corpus-jsonl-not-utf8", (*PREPARE, "--corpus", "c.jsonl"),
         write("c.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
         ("c.jsonl: not valid UTF-8 (byte offset 28)",)),
    Case("corpus-text-not-utf8", (*PREPARE, "--corpus", "corpus"),
         write("corpus/a.txt", NOT_UTF8), ("a.txt: not valid UTF-8 (byte offset 3)",)),
    Case("corpus-wiki-not-utf8", (*PREPARE, "--corpus", "wiki"),
         write(f"wiki/{WIKI}", b'{"A": {"extract": "caf\xe9"}}'),
         (f"{WIKI}: not valid UTF-8 (byte offset 22)",)),
    Case("corpus-wiki-not-json", (*PREPARE, "--corpus", WIKI),
         write(WIKI, '{"A": {"extract": "x"},}'), (WIKI, "not valid JSON")),
    Case("corpus-wiki-not-an-object", (*PREPARE, "--corpus", WIKI),
         write(WIKI, '["A", "B", "C"]'), (WIKI, "expected a JSON object of articles")),
    Case("corpus-dataset-without-text-column", (*PREPARE, "--corpus", "ds"),
         dataset_with_column("body"), ("has no column 'text'", "prepare_data.text_field")),
    Case("corpus-dataset-damaged", (*PREPARE, "--corpus", "ds"),
         write("ds/dataset_info.json", "{}"), ("ds", "could not load the saved dataset")),
    # eval-ppl: the prepared data
    Case("prepared-missing", EVAL, None, ("prepared/val.safetensors", "does not exist")),
    Case("prepared-other-tokenizer", ("eval-ppl", "--model", "{other}", *EVAL[3:]), prepared(),
         ("val.safetensors", "was made with base model", "tokenizer")),
    Case("prepared-split-missing", EVAL,
         prepared(lambda p: (p / "val.safetensors").unlink()),
         ("prepared/val.safetensors does not exist",)),
    Case("prepared-jsonl-missing", EVAL, prepared(lambda p: (p / "val.jsonl").unlink()),
         ("prepared/val.jsonl does not exist", "prepare-data")),
    Case("prepared-document-count-mismatch", EVAL,
         prepared(lambda p: drop_last_line(p / "val.jsonl")),
         ("val.jsonl has 7 documents", "val.safetensors has 8")),
    Case("prepared-jsonl-bad-line", EVAL, prepared(lambda p: break_line_2(p / "val.jsonl")),
         ("val.jsonl:2: not valid JSON",)),
    Case("prepared-jsonl-not-utf8", EVAL,
         prepared(lambda p: (p / "val.jsonl").write_bytes(b'{"text": "\xff"}\n')),
         ("val.jsonl: not valid UTF-8 (byte offset 10)",)),
    Case("prepared-not-safetensors", EVAL,
         prepared(lambda p: (p / "val.safetensors").write_bytes(b"PK\x03\x04 a zip")),
         ("val.safetensors is not a safetensors file",)),
    Case("prepared-safetensors-not-from-newllm", EVAL,
         safetensors_without_metadata("prepared/val.safetensors"),
         ("val.safetensors has no newllm metadata",)),
    Case("prepared-wrong-artifact-kind", EVAL,
         copy_from_foreign("pairs/layer2/pairs.safetensors", "prepared/val.safetensors"),
         ("is a 'hidden-embedding-pairs' artifact, expected 'prepared-split'",)),
    # extract-pairs
    Case("extract-layer-out-of-range", (*EXTRACT, "--hidden-index", "3"), None,
         ("extract_pairs.hidden_index", "[-3, 2]")),
    Case("extract-layer-out-of-range-negative", (*EXTRACT, "--hidden-index", "-4"), None,
         ("extract_pairs.hidden_index", "[-3, 2]")),
    Case("extract-max-tokens-zero", (*EXTRACT, "--max-tokens", "0"), None,
         ("--max-tokens", "extract_pairs.max_tokens must be an integer >= 1")),
    # train-converter
    Case("train-pairs-missing", TRAIN, None, ("pairs/layer2/pairs.safetensors", "does not exist")),
    Case("train-pairs-from-another-model", TRAIN,
         copy_from_foreign("pairs/layer2/pairs.safetensors", "pairs/layer2/pairs.safetensors"),
         ("pairs/layer2/pairs.safetensors", "was made with base model")),
    Case("train-pairs-not-safetensors", TRAIN,
         write("pairs/layer2/pairs.safetensors", '{"X": [1, 2]}'),
         ("pairs.safetensors is not a safetensors file",)),
    Case("train-layer-out-of-range", (*TRAIN, "--hidden-index", "5"), None,
         ("train_converter.hidden_index", "[-3, 2]")),
    # converter-report
    Case("report-folder-missing", REPORT, None, ("converter_report.converters 'cm'",
                                                 "not a folder")),
    Case("report-declared-layer-missing", REPORT,
         converter_metrics({"layer1_linear": report_metrics(), "layer1_mlp": report_metrics(),
                            "layer2_linear": report_metrics()}),
         ("cm/layer2_mlp.json does not exist", "train-converter")),
    Case("report-malformed-json", REPORT,
         converter_metrics({"layer1_linear": '{"topk": 3,'}),
         ("cm/layer1_linear.json: not valid JSON",)),
    Case("report-not-an-object", REPORT, converter_metrics({"layer1_linear": [1, 2]}),
         ("cm/layer1_linear.json: expected a JSON object",)),
    Case("report-old-format-without-topk", REPORT,
         converter_metrics({"layer1_linear": report_metrics(drop="topk")}),
         ("cm/layer1_linear.json has no integer 'topk'",)),
    Case("report-old-format-without-val-top1", REPORT,
         converter_metrics({"layer1_linear": report_metrics(drop="val_top1")}),
         ("cm/layer1_linear.json has no finite number 'val_top1'",)),
    Case("report-not-utf8", REPORT, converter_metrics({"layer1_linear": b'{"topk": "\xff"}'}),
         ("cm/layer1_linear.json: not valid UTF-8",)),
    Case("report-topk-differ", REPORT,
         converter_metrics({"layer1_linear": report_metrics(3), "layer1_mlp": report_metrics(3),
                            "layer2_linear": report_metrics(3),
                            "layer2_mlp": report_metrics(5)}),
         ("different topk values [3, 5]",)),
    Case("report-bad-model-types", (*REPORT, "--model-types", "[linear, identity]"), None,
         ("per_layer.model_types", "one of 'linear', 'mlp'", "['linear', 'identity']")),
    Case("report-model-types-twice", (*REPORT, "--model-types", "[mlp, mlp]"), None,
         ("per_layer.model_types ['mlp', 'mlp'] names one twice",)),
    Case("report-layers-empty", (*REPORT, "--layers", "[]"), None,
         ("per_layer.layers is empty",)),
    # demo-recursive
    Case("demo-converter-from-another-model", DEMO,
         copy_from_foreign("conv/layer2_linear/converter.safetensors", "conv.safetensors"),
         ("conv.safetensors", "was made with base model")),
    Case("demo-converter-missing", DEMO, None, ("conv.safetensors does not exist",)),
    Case("demo-converter-wrong-kind", DEMO,
         copy_from_foreign("pairs/layer2/pairs.safetensors", "conv.safetensors"),
         ("is a 'hidden-embedding-pairs' artifact", "hidden-to-embedding-converter")),
    Case("demo-converter-not-safetensors", DEMO, write("conv.safetensors", "not tensors"),
         ("conv.safetensors is not a safetensors file",)),
    Case("demo-empty-compress-text", (*DEMO, "--compress-text", "  "), None,
         ("demo_recursive.compress_text is empty",)),
    # train-lm, eval-reversal, eval-memory, infini-report (Infini-attention line)
    Case("train-lm-prepared-missing", TRAIN_LM, None,
         ("prepared/train.safetensors does not exist",)),
    Case("train-lm-shortlist-over-vocabulary", (*TRAIN_LM, "--shortlist", "5000",
                                                       "--reversal-facts", "null"), prepared(),
         ("train_lm.shortlist (5000) must be below the vocabulary size",)),
    Case("train-lm-pairs-bad-row", (*TRAIN_LM, "--reversal-facts", "p.csv"),
         prepared(lambda p: (p.parent / "p.csv").write_text("child,parent\nA,B\nC\n")),
         ("p.csv:3: has fewer fields",)),
    Case("train-lm-facts-over-budget", (*TRAIN_LM, "--reversal-repeats", "100"), prepared(),
         ("more than train_lm.max_train_tokens (512)", "reversal_repeats")),
    Case("reversal-pairs-missing", (*REVERSAL, "--pairs", "nope.csv"), None,
         ("eval_reversal.pairs 'nope.csv' does not exist",)),
    Case("reversal-pairs-bad-row", (*REVERSAL, "--pairs", "p.csv"),
         write("p.csv", "child,parent,parent_type\nA,B,father\n,D,mother\n"),
         ("p.csv:3: 'child' is missing or empty",)),
    Case("reversal-jsonl-not-an-object", (*REVERSAL, "--pairs", "p.jsonl", "--format", "jsonl"),
         write("p.jsonl", '{"child": "A", "parent": "B"}\n[1, 2]\n'),
         ("p.jsonl:2: expected a JSON object",)),
    Case("reversal-bad-templates", (*REVERSAL, "--templates", "one template only"), None,
         ("eval_reversal.templates must be a list of two templates [forward, backward]",)),
    Case("reversal-infini-lm-without-checkpoint", (*REVERSAL, "--model-kind", "infini-lm"),
         None, ("model kind infini-lm needs a checkpoint",)),
    Case("reversal-too-many-distractors", (*REVERSAL, "--pairs", "p.csv", "--distractors", "5"),
         write("p.csv", "child,parent\nA,B\nC,D\n"),
         ("eval_reversal.distractors (5) needs at least 6 distinct parents",)),
    Case("memory-checkpoint-missing", MEMORY, None, ("lm.safetensors does not exist",)),
    Case("memory-checkpoint-wrong-kind", MEMORY,
         copy_from_foreign("pairs/layer2/pairs.safetensors", "lm.safetensors"),
         ("is a 'hidden-embedding-pairs' artifact, expected 'infini-lm'",)),
    Case("memory-bad-passkey-fillers", (*MEMORY, "--passkey-fillers", "[1, x]"), None,
         ("eval_memory.passkey_fillers must be a list of integers >= 0",)),
    Case("eval-ppl-infini-lm-wrong-artifact", (*EVAL, "--model-kind", "infini-lm",
                                               "--checkpoint", "prepared/val.safetensors"),
         prepared(), ("is a 'prepared-split' artifact, expected 'infini-lm'",)),
    Case("adapter-replace-frozen", (*ADAPTER, "--mode", "replace", "--freeze-base-model",
                                    "true"), prepared(),
         ("train_infini_adapter.freeze_base_model is for mode parallel",)),
    Case("adapter-facts-over-budget", (*ADAPTER, "--reversal-facts", "shipped",
                                       "--reversal-repeats", "100"), prepared(),
         ("more than train_infini_adapter.max_train_tokens (400)", "reversal_repeats")),
    Case("infini-report-metrics-missing", INFINI_REPORT, writes(
        ("ppl.json", '{"token_ppl": 3}'),
        ("params.yaml", "infini_runs: {pythia: {kind: pythia}}\n"
                        "adapter_runs: {parallel: {mode: parallel}}\n")),
         ("im/eval_reversal.json does not exist",)),
    Case("infini-report-runs-missing", INFINI_REPORT, write("ppl.json", '{"token_ppl": 3}'),
         ("params.yaml: expected params group 'infini_runs' to map run names",)),
    # chameleon: self-generate, estimate-directions, eval-chameleon
    Case("chameleon-gold-tag-unknown", (*SELFGEN, "--data", "dev_questions.json"),
         lamp2([lamp2_question([{"id": "1", "description": "d", "tag": "comedy"}])],
               [{"id": "7", "output": "horror"}]),
         ("dev_outputs.json", "gold of question 7 is 'horror'", "not one of the task's tags")),
    Case("chameleon-empty-profile", (*SELFGEN, "--data", "dev_questions.json"),
         lamp2([lamp2_question([])], [{"id": "7", "output": "comedy"}]),
         ("dev_questions.json", "question 7 has an empty profile")),
    Case("chameleon-template-without-profile",
         (*SELFGEN, "--personalized-template", "Guess: {{question}}"), None,
         ("self_generate.personalized_template has no {profile} placeholder",)),
    Case("chameleon-data-neither", (*SELFGEN, "--data", "notes.txt"), write("notes.txt", "x"),
         ("chameleon_data.data 'notes.txt' is neither a MovieLens folder",)),
    Case("chameleon-layer-out-of-range", (*ESTIMATE, "--target-decoder-layers", "[1, 2]"), None,
         ("estimate_directions.target_decoder_layers must hold decoder layer indices in "
          "[-2, 1]", "got 2.")),
    Case("chameleon-module-path-unknown",
         (*ESTIMATE, "--target-decoder-layers", "[model.layers.0.attn_out]"), None,
         ("estimate_directions.target_decoder_layers", "no module 'model.layers.0.attn_out'")),
    Case("chameleon-layers-not-a-list", (*ESTIMATE, "--target-decoder-layers", "{{a: 1}}"), None,
         ("estimate_directions.target_decoder_layers must be a list of integers or strings",)),
    Case("chameleon-generations-missing", (*ESTIMATE, "--target-decoder-layers", "1"), None,
         ("gen.safetensors does not exist",)),
    Case("chameleon-directions-from-another-model", EVALCHAM, foreign_directions,
         ("dir.safetensors", "was made with base model")),
    Case("chameleon-directions-wrong-kind", EVALCHAM,
         copy_from_foreign("pairs/layer2/pairs.safetensors", "dir.safetensors"),
         ("is a 'hidden-embedding-pairs' artifact, expected 'chameleon-directions'",)),
    # CVFP
    Case("phase1-layer-counts-differ", (*PHASE1, "--context-layers", "2", "--token-layers", "1"),
         prepared(), ("phase1_context.context_layers (2) must equal "
                      "phase1_context.token_layers (1)",)),
    Case("phase1-too-few-train-tokens", (*PHASE1, "--tokens-per-block", "100000000"),
         prepared(), ("phase1_context needs 2 x 100000000",
                      "lower phase1_context.tokens_per_block")),
    Case("prep-cache-blocks-wrong-kind", (*PREP, "--blocks", "pairs.safetensors"),
         copy_from_foreign("pairs/layer2/pairs.safetensors", "pairs.safetensors"),
         ("is a 'hidden-embedding-pairs' artifact", "cvfp-context-blocks")),
    Case("phase2-cache-missing", PHASE2, cvfp_blocks,
         ("cache/index.json does not exist", "phase2-prep-cache")),
    Case("phase2-tied-head-with-trained-embeddings", (*PHASE2, "--freeze-embeddings", "false"),
         cvfp_blocks, ("phase2_token.head tied_frozen", "use head: trainable")),
    Case("cvfp-grid-unknown-config", ("cvfp-grid", "--model", "{model}", "--config", "nope",
                                      "--metrics-dir", "grid", "--plots-dir", "gridplots"),
         None, ("cvfp_grid.config: unknown configuration 'nope'", "blocks2_500")),
    Case("eval-ppl-cvfp-without-checkpoint", (*EVAL, "--model-kind", "cvfp"), prepared(),
         ("eval_ppl.checkpoint is null", "model_kind cvfp")),
    Case("eval-ppl-hf-with-checkpoint", (*EVAL, "--checkpoint", "x.safetensors"), prepared(),
         ("eval_ppl.checkpoint (x.safetensors) is for trained model kinds",)),
    # virtual tokens: build-e-star, train-compressor, reconstruct-capacity
    Case("e-star-num-virtual-zero", (*E_STAR, "--num-virtual", "0"), prepared(),
         ("--num-virtual", "build_e_star.num_virtual must be an integer >= 1")),
    Case("e-star-follow-longer-than-context", (*E_STAR, "--follow-tokens", "600"), prepared(),
         ("1 + build_e_star.text_tokens + follow_tokens = 609 positions exceed the base "
          "model's context of 512",)),
    Case("compressor-e-star-from-another-model", COMPRESSOR, foreign_e_star,
         ("es/train.safetensors", "was made with base model 'another-model'")),
    Case("compressor-e-star-wrong-kind", COMPRESSOR,
         copy_from_foreign("pairs/layer2/pairs.safetensors", "es/train.safetensors"),
         ("is a 'hidden-embedding-pairs' artifact, expected 'virtual-token-e-star'",)),
    Case("capacity-bad-lengths", ("reconstruct-capacity", "--model", "{model}", "--lengths",
                                  "[4, x]", "--metrics", "c.json", "--plot", "c.csv"), None,
         ("reconstruct_capacity.lengths must be a list of integers >= 1", "[4, 'x']")),
    Case("eval-compressor-no-runs", ("eval-compressor", "--model", "{model}"), None,
         ("params.yaml: expected params group 'compressor_runs'",)),
    Case("compressor-name-dots", ("train-compressor", "--model", "{model}", "--name", ".."),
         None, ("train_compressor.name must be a plain file name",)),
    # click's own checks on the command line (a value outside its choices, not a number, an
    # unknown option): one line too, naming the command and the option.
    Case("usage-bad-choice", ("train-compressor", "--model", "{model}", "--arch", "mlp"), None,
         ("newllm train-compressor: Invalid value for '--arch'", "train_compressor.arch",
          "'hyper'", "--help")),
    Case("usage-not-a-number", ("eval-reversal", "--model", "{model}", "--inject-fraction",
                                "half"), None,
         ("newllm eval-reversal: Invalid value for '--inject-fraction'",
          "eval_reversal.inject_fraction must be a number")),
    Case("usage-unknown-option", ("eval-memory", "--model", "{model}", "--passkeys", "3"),
         None, ("newllm eval-memory: No such option '--passkeys'", "--passkey-trials")),
    # fetch-assets: a file where the assets folder should be (nothing is downloaded first).
    Case("fetch-assets-dir-is-a-file", ("fetch-assets", "--assets-dir", "assets",
                                        "--metrics", "fa.json"),
         write("assets", "a file"), ("--assets-dir assets", "is a file, where")),
]


def test_the_matrix_is_wide():
    stages = {next(a for a in case.args if not a.startswith("-") and "." not in a)
              for case in CASES}
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert {"prepare-data", "eval-ppl", "extract-pairs", "train-converter", "converter-report",
            "demo-recursive", "fetch-assets", "train-lm", "eval-reversal", "eval-memory",
            "infini-report", "self-generate", "estimate-directions", "eval-chameleon",
            "phase1-context", "phase2-prep-cache", "phase2-token", "cvfp-grid",
            "build-e-star", "train-compressor", "reconstruct-capacity"} <= stages


@pytest.fixture(scope="module")
def foreign(other_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs and a converter made with the other tiny model (another tokenizer and weights)."""
    folder = tmp_path_factory.mktemp("foreign")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for args in (("extract-pairs", "--model", str(other_tiny_model), "--max-tokens", "40",
                      "--out-dir", "pairs", "--metrics-dir", "pm"),
                     ("train-converter", "--model", str(other_tiny_model), "--pairs-dir",
                      "pairs", "--epochs", "1", "--hidden-dim", "8", "--out-dir", "conv",
                      "--metrics-dir", "cm", "--plots-dir", "cp")):
            with pytest.raises(SystemExit) as exit_info:
                main(list(args))
            assert exit_info.value.code == 0
    return folder


@pytest.fixture(scope="module")
def chameleon_foreign(other_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chameleon directions made with the other tiny model (another tokenizer and weights)."""
    from chameleon_helpers import make_mini_movielens

    folder = tmp_path_factory.mktemp("chameleon-foreign")
    make_mini_movielens(folder / "ml-mini")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for args in (("self-generate", "--model", str(other_tiny_model), "--data", "ml-mini",
                      "--num-direction-users", "3", "--num-eval-users", "3",
                      "--max-new-tokens", "2", "--out", "gen.safetensors", "--metrics", "sg.json"),
                     ("estimate-directions", "--model", str(other_tiny_model), "--generations",
                      "gen.safetensors", "--target-decoder-layers", "[1]", "--out",
                      "dir.safetensors",
                      "--metrics", "ed.json")):
            with pytest.raises(SystemExit) as exit_info:
                main(list(args))
            assert exit_info.value.code == 0
    return folder


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with a file's bytes (None for a folder)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case: Case, run_cli, tmp_path, tiny_model,
                                                  other_tiny_model, mini_corpus, request):
    env = {"model": tiny_model, "other": other_tiny_model, "corpus": mini_corpus}
    if case.setup is not None:
        # setups made by prepared() / copy_from_foreign() need that fixture's folder
        needs = {"prepared": ("prepared", "prepared_tiny"),
                 "cvfp_blocks": ("prepared", "prepared_tiny"),
                 "copy_from_foreign": ("foreign", "foreign"),
                 "foreign_directions": ("chameleon_foreign", "chameleon_foreign")}.get(
            case.setup.__qualname__.split(".")[0])
        if needs is not None:
            env[needs[0]] = request.getfixturevalue(needs[1])
        case.setup(tmp_path, env)
    before = _tree(tmp_path)
    args = [a.format(**{k: str(v) for k, v in env.items()}) for a in case.args]
    result = run_cli(*args, cwd=tmp_path)
    assert result.code == 2, (result.code, result.err)
    assert_one_line_error(result, *case.needles)
    assert _tree(tmp_path) == before, "a failed command left files behind"
