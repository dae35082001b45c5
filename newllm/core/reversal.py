"""The reversal curse (Berglund et al. 2023): does a model that knows "A's parent is B"
also know "B's child is A"?

Pairs come from the paper's `parent_child_pairs.csv` (columns `child`, `parent`,
`parent_type`, ...; extra columns are ignored), from a JSONL file (one object per line with
`child` and `parent`, optional `parent_type`, `inverse_type`, and optionally its own
`forward` / `backward` sentences), or from the small file this package ships
(`newllm/core/reversal_pairs.csv`: people, places and inventions, in the CSV format with
an extra `inverse_type` column). Per pair, with the templates (a forward and a backward one,
default "{child}'s {parent_type} is {parent}." and "{parent}'s {inverse_type} is {child}.",
inverse_type defaulting to "child"):

- forward PPL  = exp(mean NLL of the forward sentence's tokens), read after the separator;
  backward PPL likewise; the figures are means over pairs of the per-pair PPLs;
- reversal ratio = forward PPL / backward PPL (1 = no asymmetry; < 1: the forward
  direction is easier) and gap = backward PPL − forward PPL;
- rank accuracy, per direction: the prompt ("{child}'s {parent_type} is") is completed with
  the true answer and with `distractors` other answers of the same column drawn from the
  file (seeded); a pair counts when the true completion's summed log-likelihood is strictly
  the highest. Chance is 1 / (distractors + 1).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from newllm.core.data import jsonl_lines, read_utf8
from newllm.core.errors import NewllmError

SHIPPED_PAIRS = Path(__file__).with_name("reversal_pairs.csv")
SHIPPED = "shipped"  # a pairs path that names the file shipped with this package
FORMATS = ("csv", "jsonl")
DEFAULT_TEMPLATES = ["{child}'s {parent_type} is {parent}.",  # forward, backward (a params
                     "{parent}'s {inverse_type} is {child}."]  # default: param copies it)
FIELDS = ("child", "parent", "parent_type", "inverse_type")


@dataclass(frozen=True)
class Pair:
    child: str
    parent: str
    parent_type: str = "parent"
    inverse_type: str = "child"
    forward: str | None = None  # the file's own sentences (JSONL), else the templates'
    backward: str | None = None
    line: int = 0

    @property
    def key(self) -> str:
        return f"{self.child}\t{self.parent}"


def _check_text(path: Path, line: int, name: str, value: Any, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise NewllmError(f"{path}:{line}: '{name}' is missing or empty; expected a "
                              "non-empty string.")
        return None
    if not isinstance(value, str):
        raise NewllmError(f"{path}:{line}: '{name}' is a {type(value).__name__}; expected a "
                          "string.")
    return value.strip()


def _pair(path: Path, line: int, row: dict[str, Any]) -> Pair:
    child = _check_text(path, line, "child", row.get("child"), True)
    parent = _check_text(path, line, "parent", row.get("parent"), True)
    parent_type = _check_text(path, line, "parent_type", row.get("parent_type"), False)
    inverse_type = _check_text(path, line, "inverse_type", row.get("inverse_type"), False)
    forward = _check_text(path, line, "forward", row.get("forward"), False)
    backward = _check_text(path, line, "backward", row.get("backward"), False)
    for name, sentence, answer in (("forward", forward, parent), ("backward", backward, child)):
        if sentence is not None and not sentence.rstrip(".!? ").endswith(answer):
            raise NewllmError(f"{path}:{line}: the '{name}' sentence must end with its answer "
                              f"'{answer}' (rank accuracy completes the prompt before it).")
    return Pair(child, parent, parent_type or "parent", inverse_type or "child", forward,
                backward, line)


def read_pairs_csv(path: Path) -> list[Pair]:
    """The reversal-curse paper's parent_child_pairs.csv format (header row required)."""
    text = read_utf8(path, "a CSV of child/parent pairs")
    reader = csv.DictReader(io.StringIO(text))
    missing = {"child", "parent"} - set(reader.fieldnames or [])
    if missing:
        raise NewllmError(f"{path}:1: the header lacks column(s) {', '.join(sorted(missing))}; "
                          "expected at least child,parent (as parent_child_pairs.csv).")
    pairs = []
    for row in reader:
        line = reader.line_num
        if None in row:  # more fields than the header names
            raise NewllmError(f"{path}:{line}: has more fields than the header's "
                              f"{len(reader.fieldnames or [])}.")
        if any(v is None for v in row.values()):
            raise NewllmError(f"{path}:{line}: has fewer fields than the header's "
                              f"{len(reader.fieldnames or [])}.")
        pairs.append(_pair(path, line, row))
    return pairs


def read_pairs_jsonl(path: Path) -> list[Pair]:
    pairs = []
    for line, row in jsonl_lines(path, "child/parent pairs"):
        if not isinstance(row, dict):
            raise NewllmError(f"{path}:{line}: expected a JSON object with 'child' and "
                              "'parent'.")
        pairs.append(_pair(path, line, row))
    return pairs


def read_pairs(path: str | Path, fmt: str, max_pairs: int | None = None,
               key: str = "eval_reversal.pairs") -> list[Pair]:
    """Pairs of a CSV or JSONL file (the first `max_pairs`); duplicates are an error. `key`:
    the parameter that named the file, for the error when it is not there."""
    path = resolve_pairs(path)
    if not path.is_file():
        raise NewllmError(f"{key} '{path}' does not exist; expected a {fmt} file "
                          "of child/parent pairs.")
    if fmt not in FORMATS:
        raise NewllmError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    pairs = read_pairs_csv(path) if fmt == "csv" else read_pairs_jsonl(path)
    seen: dict[str, int] = {}
    for pair in pairs:
        if pair.key in seen:
            raise NewllmError(f"{path}:{pair.line}: repeats the pair of line {seen[pair.key]} "
                              f"({pair.child} / {pair.parent}).")
        seen[pair.key] = pair.line
    if not pairs:
        raise NewllmError(f"{path} holds no pairs.")
    return pairs[:max_pairs] if max_pairs is not None else pairs


def resolve_pairs(path: str | Path) -> Path:
    """`shipped` is the package's own pairs file; anything else a path."""
    return SHIPPED_PAIRS if str(path) == SHIPPED else Path(path)


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(resolve_pairs(path).read_bytes()).hexdigest()


def parse_templates(templates: Sequence[str],
                    key: str = "eval_reversal.templates") -> tuple[str, str]:
    """[forward, backward] format strings over child, parent, parent_type, inverse_type;
    each must end with its answer ({parent}, {child}) and optional punctuation. `key` is the
    params key named in errors."""
    parts = list(templates) if isinstance(templates, (list, tuple)) else None
    if parts is None or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise NewllmError(f"{key} must be a list of two templates [forward, backward], got "
                          f"{templates!r}.")
    for part, answer in zip(parts, ("{parent}", "{child}"), strict=True):
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(part) if f is not None}
        except ValueError:  # an unbalanced brace
            names = {"?"}
        if not names <= set(FIELDS) or not part.rstrip(".!? ").endswith(answer):
            raise NewllmError(f"{key}: {part!r} must use only "
                              f"{', '.join('{' + f + '}' for f in FIELDS)} and end with "
                              f"{answer}.")
    return parts[0], parts[1]


def sentences(pair: Pair, templates: tuple[str, str]) -> tuple[str, str]:
    values = {"child": pair.child, "parent": pair.parent, "parent_type": pair.parent_type,
              "inverse_type": pair.inverse_type}
    forward = pair.forward or templates[0].format(**values)
    backward = pair.backward or templates[1].format(**values)
    return forward[:1].upper() + forward[1:], backward[:1].upper() + backward[1:]


def split_prompt(sentence: str, answer: str) -> tuple[str, str]:
    """'A's parent is B.' -> ('A's parent is', ' B.'): the prompt and the answer's completion."""
    stripped = sentence.rstrip(".!? ")
    cut = len(stripped) - len(answer)
    return sentence[:cut].rstrip(), " " + sentence[cut:].lstrip()


def forward_sentences(pairs: list[Pair],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """The forward sentences of `pairs` (what train-lm's `reversal_facts` injects)."""
    parsed = parse_templates(templates)
    return [sentences(p, parsed)[0] for p in pairs]


def injected_split(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Every pair whose index i has ⌊(i+1)·f⌋ > ⌊i·f⌋ is injected (evenly spread), the rest
    are the never-injected control."""
    injected = [p for i, p in enumerate(pairs) if math.floor((i + 1) * fraction)
                > math.floor(i * fraction)]
    keys = {p.key for p in injected}
    return injected, [p for p in pairs if p.key not in keys]


@dataclass(frozen=True)
class Injection:
    """What a trainer's `reversal_facts` puts into its training stream, and records."""

    pairs: list[Pair]  # the whole file (empty without one)
    injected: list[Pair]
    control: list[Pair]  # never injected
    facts: list[list[int]]  # token ids of the injected forward sentences, `repeats` times over
    record: dict[str, Any]  # for the checkpoint's meta: pairs, pairs_hash, injected, control


def inject_facts(tokenizer: Any, path: str | None, fmt: str, fraction: float, repeats: int,
                 templates: Sequence[str] = DEFAULT_TEMPLATES,
                 key: str = "reversal_facts") -> Injection:
    """The forward sentences of the `fraction` of the pairs of `path` chosen by
    `injected_split`, tokenized (no special tokens) and repeated `repeats` times; the rest are
    the never-injected control. The record is what eval-reversal reads from a checkpoint to
    split its figures the same way. `path` None: nothing injected."""
    if path is None:
        return Injection([], [], [], [], {"pairs": None, "pairs_hash": None, "injected": [],
                                          "control": []})
    pairs = read_pairs(path, fmt, key=key)
    injected, control = injected_split(pairs, fraction)
    facts = [tokenizer(s, add_special_tokens=False)["input_ids"]
             for s in forward_sentences(injected, templates)] * repeats
    return Injection(pairs, injected, control, facts,
                     {"pairs": path, "pairs_hash": file_hash(path),
                      "injected": [p.key for p in injected],
                      "control": [p.key for p in control]})


# --- scoring ------------------------------------------------------------------------------

def sequence_logprobs(scorer: Any, sequences: list[list[int]],
                      batch_size: int = 16) -> list[torch.Tensor]:
    """Per sequence, log p(x_t | x_<t) for t = 1.., from an eval-ppl scorer's logits (rows are
    right-padded: under causal attention padding after a row cannot change it)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = len(sequences[rows[0]])
        ids = torch.full((len(rows), length), scorer.separator_id, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
        with torch.inference_mode():
            logits = scorer.logits(ids.to(scorer.device), length).float()
            log_probs = torch.log_softmax(logits, dim=-1).cpu()
        for r, i in enumerate(rows):
            n = len(sequences[i])
            targets = ids[r, 1:n]
            results[i] = log_probs[r, :n - 1].gather(-1, targets[:, None]).squeeze(-1)
    return [results[i] for i in range(len(sequences))]


@dataclass(frozen=True)
class PairScores:
    forward_ppl: float
    backward_ppl: float
    forward_correct: bool
    backward_correct: bool


def score_pairs(scorer: Any, tokenizer: Any, pairs: list[Pair], pool: list[Pair],
                templates: Sequence[str], distractors: int, seed: int) -> list[PairScores]:
    """Forward/backward PPL and rank correctness of each pair; distractors come from `pool`."""
    parsed = parse_templates(templates)
    rng = random.Random(seed)
    sep = scorer.separator_id

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    parents = sorted({p.parent for p in pool})
    children = sorted({p.child for p in pool})
    for name, names in (("parents", parents), ("children", children)):
        if len(names) - 1 < distractors:
            raise NewllmError(f"eval_reversal.distractors ({distractors}) needs at least "
                              f"{distractors + 1} distinct {name} in the pairs file, it has "
                              f"{len(names)}.")
    whole: list[list[int]] = []
    completions: list[tuple[int, list[int], int]] = []  # (pair, sequence, prompt length)
    groups: list[tuple[int, str, int, int]] = []  # (pair, direction, first, count)
    for index, pair in enumerate(pairs):
        forward, backward = sentences(pair, parsed)
        whole += [[sep, *encode(forward)], [sep, *encode(backward)]]
        for direction, sentence, answer, names in (("forward", forward, pair.parent, parents),
                                                   ("backward", backward, pair.child, children)):
            prompt, completion = split_prompt(sentence, answer)
            suffix = completion[len(answer) + 1:]  # the punctuation after the answer
            others = rng.sample([n for n in names if n != answer], distractors)
            prompt_ids = [sep, *encode(prompt)]
            groups.append((index, direction, len(completions), distractors + 1))
            for candidate in (answer, *others):
                completions.append((index, prompt_ids + encode(f" {candidate}{suffix}"),
                                    len(prompt_ids)))
    whole_lp = sequence_logprobs(scorer, whole)
    comp_lp = sequence_logprobs(scorer, [c[1] for c in completions])
    totals = [float(lp[plen - 1:].sum()) for (_, _, plen), lp in
              zip(completions, comp_lp, strict=True)]
    correct: dict[tuple[int, str], bool] = {}
    for index, direction, first, count in groups:
        true, rest = totals[first], totals[first + 1:first + count]
        correct[(index, direction)] = all(true > other for other in rest)
    return [PairScores(math.exp(-float(whole_lp[2 * i].mean())),
                       math.exp(-float(whole_lp[2 * i + 1].mean())),
                       correct[(i, "forward")], correct[(i, "backward")])
            for i in range(len(pairs))]


def summarize(scores: list[PairScores], prefix: str = "") -> dict[str, float | int]:
    """Means over pairs: forward/backward PPL, their ratio and gap, rank accuracies."""
    if not scores:
        return {f"{prefix}pairs": 0}
    forward = sum(s.forward_ppl for s in scores) / len(scores)
    backward = sum(s.backward_ppl for s in scores) / len(scores)
    return {
        f"{prefix}pairs": len(scores),
        f"{prefix}forward_ppl": forward,
        f"{prefix}backward_ppl": backward,
        f"{prefix}reversal_ratio": forward / backward,
        f"{prefix}reversal_gap": backward - forward,
        f"{prefix}forward_rank_accuracy": sum(s.forward_correct for s in scores) / len(scores),
        f"{prefix}backward_rank_accuracy": sum(s.backward_correct for s in scores) / len(scores),
    }
