"""The reversal curse (Berglund et al. 2023): does a model that knows "A's parent is B"
also know "B's child is A"?

Pairs come from the paper's `parent_child_pairs.csv` (columns `child`, `parent`,
`parent_type`, ...; extra columns are ignored; a repeated child/parent row, which the
paper's file has, is dropped with one warning giving the count), from a JSONL file (one
object per line with `child` and `parent`, optional `parent_type`, `inverse_type`, and
optionally its own `forward` / `backward` sentences), or from the small file this package
ships (`newllm/core/reversal_pairs.csv`: people, places and inventions, in the CSV format
with an extra `inverse_type` column). Per pair, with the templates (a forward and a backward
one, default "{child}'s {parent_type} is {parent}." and "{parent}'s {inverse_type} is
{child}.", inverse_type defaulting to "child"), each direction is scored on its answer only:

- the prompt is the sentence before the answer ("Tom Cruise's mother is"; backward "Mary Lee
  Pfeiffer's child is"); the answer log-probability is log p(" " + answer | separator,
  prompt), summed over the answer's tokens (the leading name and the final punctuation are
  never scored, so a name the model has read before cannot lower the figure by itself);
- rank accuracy: the prompt is completed with the true answer and with `distractors` other
  answers of the same type: names in the same column of pairs with the same relation
  (parent_type, inverse_type), so fathers compete with fathers and capitals with capitals,
  drawn from the pool (seeded); a pair counts when the true answer's log-probability is
  strictly the highest. Chance is 1 / (distractors + 1). The margin (the answer's
  log-probability minus the distractors' mean) is the same comparison in nats: a name made
  familiar by training raises every candidate's log-probability, not the margin;
- `summarize` gives the means over pairs with 95 % intervals (bootstrap for log-probs,
  Wilson for accuracies, `newllm.core.stats`).

`fictitious_pairs` makes child/parent pairs of invented people (no name of a given real
pairs file), for injection experiments on a pretrained base that cannot know them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
import string
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from newllm.core.data import jsonl_lines, read_utf8
from newllm.core.errors import NewllmError
from newllm.core.stats import bootstrap_interval, wilson_interval

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

    @property
    def relation(self) -> tuple[str, str]:
        """The type of the pair: its answers' distractors share it."""
        return (self.parent_type, self.inverse_type)


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
    """Pairs of a CSV or JSONL file (the first `max_pairs`). A row repeating an earlier
    row's child and parent is dropped (the first is kept), with one warning on stderr giving
    the count. `key`: the parameter that named the file, for the error when it is not
    there."""
    path = resolve_pairs(path)
    if not path.is_file():
        raise NewllmError(f"{key} '{path}' does not exist; expected a {fmt} file "
                          "of child/parent pairs.")
    if fmt not in FORMATS:
        raise NewllmError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    rows = read_pairs_csv(path) if fmt == "csv" else read_pairs_jsonl(path)
    pairs, seen = [], set()
    for pair in rows:
        if pair.key not in seen:
            seen.add(pair.key)
            pairs.append(pair)
    if len(pairs) < len(rows):
        print(f"warning: {path}: dropped {len(rows) - len(pairs)} repeated row(s) (a child "
              "and parent already on an earlier line); each pair counts once.",
              file=sys.stderr)
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
    """One pair's answer-only figures: log p(answer | prompt) summed over the answer's tokens
    (nats), its token count, whether it outranked every same-type distractor, and its margin
    over them (its log-probability minus their mean one)."""

    forward_logprob: float
    backward_logprob: float
    forward_tokens: int
    backward_tokens: int
    forward_correct: bool
    backward_correct: bool
    forward_margin: float
    backward_margin: float


def answer_pools(pool: list[Pair]) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """Per relation (parent_type, inverse_type): its distinct parents and children, sorted."""
    relations: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
    for pair in pool:
        parents, children = relations.setdefault(pair.relation, (set(), set()))
        parents.add(pair.parent)
        children.add(pair.child)
    return {r: (sorted(p), sorted(c)) for r, (p, c) in relations.items()}


def draw_distractors(pairs: list[Pair], pool: list[Pair], distractors: int, seed: int,
                     key: str = "eval_reversal.distractors"
                     ) -> list[tuple[list[str], list[str]]]:
    """Per pair, (forward, backward) distractors: `distractors` other parents, resp.
    children, of pairs with the pair's relation in `pool`, drawn with `seed`."""
    pools = answer_pools(pool)
    for pair in pairs:
        if pair.relation not in pools:
            raise NewllmError(f"the pair {pair.child} / {pair.parent} has relation "
                              f"'{pair.parent_type} / {pair.inverse_type}', which no pair of "
                              "the distractor pool has.")
    for relation in sorted({p.relation for p in pairs}):
        for name, names in zip(("parents", "children"), pools[relation], strict=True):
            if len(names) - 1 < distractors:
                raise NewllmError(f"{key} ({distractors}) needs at least {distractors + 1} "
                                  f"distinct {name} of relation '{relation[0]} / "
                                  f"{relation[1]}' in the pairs file, it has {len(names)}.")
    rng = random.Random(seed)
    drawn = []
    for pair in pairs:
        parents, children = pools[pair.relation]
        drawn.append((rng.sample([n for n in parents if n != pair.parent], distractors),
                      rng.sample([n for n in children if n != pair.child], distractors)))
    return drawn


@dataclass(frozen=True)
class Question:
    """A prompt, its true answer and the distractors the answer must outrank."""

    prompt: str  # "Tom Cruise's mother is"
    answer: str  # "Mary Lee Pfeiffer"
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class Answered:
    logprob: float  # log p(" " + answer | separator, prompt), summed over the answer's tokens
    tokens: int  # the answer's token count
    correct: bool  # strictly above every distractor's log-probability
    margin: float  # logprob minus the distractors' mean logprob (0: no preference)


def questions(pairs: list[Pair], pool: list[Pair], templates: Sequence[str], distractors: int,
              seed: int, key: str = "eval_reversal.distractors"
              ) -> tuple[list[Question], list[Question]]:
    """The forward and the backward question of each pair, with same-relation distractors."""
    parsed = parse_templates(templates)
    forward, backward = [], []
    for pair, (parents, children) in zip(pairs, draw_distractors(pairs, pool, distractors,
                                                                 seed, key), strict=True):
        ahead, back = sentences(pair, parsed)
        forward.append(Question(split_prompt(ahead, pair.parent)[0], pair.parent,
                                tuple(parents)))
        backward.append(Question(split_prompt(back, pair.child)[0], pair.child,
                                 tuple(children)))
    return forward, backward


def answer_questions(scorer: Any, tokenizer: Any, asked: list[Question],
                     batch_size: int = 16) -> list[Answered]:
    """Each question's answer-only log-probability and whether it outranks its distractors:
    every candidate is read as [separator, prompt, " " + candidate] and only the
    candidate's tokens are scored."""
    sep = scorer.separator_id

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    candidates: list[tuple[list[int], int]] = []  # (prompt + candidate ids, prompt length)
    for question in asked:
        prompt_ids = [sep, *encode(question.prompt)]
        candidates += [(prompt_ids + encode(f" {name}"), len(prompt_ids))
                       for name in (question.answer, *question.distractors)]
    logprobs = sequence_logprobs(scorer, [ids for ids, _ in candidates], batch_size)
    # the candidate's tokens are targets prompt_len .. end, i.e. rows prompt_len - 1 ..
    totals = [float(lp[plen - 1:].sum()) for (_, plen), lp in
              zip(candidates, logprobs, strict=True)]
    answered, first = [], 0
    for question in asked:
        count = 1 + len(question.distractors)
        others = totals[first + 1:first + count]
        answered.append(Answered(totals[first], len(candidates[first][0]) - candidates[first][1],
                                 all(totals[first] > t for t in others),
                                 totals[first] - sum(others) / len(others)))
        first += count
    return answered


def score_pairs(scorer: Any, tokenizer: Any, pairs: list[Pair], pool: list[Pair],
                templates: Sequence[str], distractors: int, seed: int,
                key: str = "eval_reversal.distractors",
                batch_size: int = 16) -> list[PairScores]:
    """Answer-only log-probabilities and rank correctness of each pair, both directions;
    distractors of the same relation come from `pool` (see the module's docstring)."""
    forward, backward = questions(pairs, pool, templates, distractors, seed, key)
    answered = answer_questions(scorer, tokenizer, forward + backward, batch_size)
    ahead, back = answered[:len(pairs)], answered[len(pairs):]
    return [PairScores(f.logprob, b.logprob, f.tokens, b.tokens, f.correct, b.correct,
                       f.margin, b.margin) for f, b in zip(ahead, back, strict=True)]


def summarize(scores: list[PairScores], prefix: str = "", seed: int = 0
              ) -> dict[str, float | int]:
    """Per direction, over pairs: the mean answer log-probability (nats per answer) and the
    mean margin over the distractors, each with its bootstrap 95 % interval, the answer-token
    PPL exp(−Σ log p / Σ answer tokens), and the rank accuracy with its Wilson 95 %
    interval."""
    if not scores:
        return {f"{prefix}pairs": 0}
    n = len(scores)
    out: dict[str, float | int] = {f"{prefix}pairs": n}
    for direction in ("forward", "backward"):
        logprobs = [getattr(s, f"{direction}_logprob") for s in scores]
        tokens = sum(getattr(s, f"{direction}_tokens") for s in scores)
        correct = sum(getattr(s, f"{direction}_correct") for s in scores)
        margins = [getattr(s, f"{direction}_margin") for s in scores]
        lo, hi = bootstrap_interval(logprobs, seed=seed)
        margin_lo, margin_hi = bootstrap_interval(margins, seed=seed)
        acc_lo, acc_hi = wilson_interval(correct, n)
        out.update({
            f"{prefix}{direction}_answer_logprob": sum(logprobs) / n,
            f"{prefix}{direction}_answer_logprob_lo": lo,
            f"{prefix}{direction}_answer_logprob_hi": hi,
            f"{prefix}{direction}_answer_margin": sum(margins) / n,
            f"{prefix}{direction}_answer_margin_lo": margin_lo,
            f"{prefix}{direction}_answer_margin_hi": margin_hi,
            f"{prefix}{direction}_answer_ppl": math.exp(-sum(logprobs) / tokens),
            f"{prefix}{direction}_rank_accuracy": correct / n,
            f"{prefix}{direction}_rank_accuracy_lo": acc_lo,
            f"{prefix}{direction}_rank_accuracy_hi": acc_hi,
        })
    return out


# --- fictitious people -------------------------------------------------------------------

FIRST_NAMES = {  # common given names; the surnames below are invented
    "father": ("James", "Robert", "Michael", "William", "David", "Richard", "Thomas",
               "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Steven", "Paul", "Andrew",
               "Joshua", "Kenneth", "Kevin", "Brian", "George", "Edward", "Ronald", "Timothy",
               "Jason", "Jeffrey", "Ryan", "Jacob", "Gary", "Nicholas", "Eric"),
    "mother": ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan",
               "Jessica", "Sarah", "Karen", "Nancy", "Lisa", "Betty", "Margaret", "Sandra",
               "Ashley", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Melissa",
               "Deborah", "Stephanie", "Rebecca", "Laura", "Sharon", "Cynthia", "Kathleen",
               "Helen"),
}
_ONSETS = ("B", "D", "F", "G", "H", "K", "L", "M", "N", "P", "R", "S", "T", "V", "W", "Z",
           "Br", "Dr", "Gr", "Kr", "Pr", "Tr", "St", "Th", "Qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_MIDDLES = ("l", "m", "n", "r", "s", "t", "v", "z", "nd", "rk", "st", "lv", "rn", "sh")
_ENDINGS = ("wick", "ton", "ford", "more", "dale", "ley", "vane", "rick", "ham", "ow", "ith",
            "ard", "ine", "oss", "er")


def _surname(rng: random.Random) -> str:
    """An invented surname: onset, vowel, [middle + vowel,] ending (e.g. 'Threalvoford')."""
    middle = rng.choice(_MIDDLES) + rng.choice(_VOWELS) if rng.random() < 0.5 else ""
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + middle + rng.choice(_ENDINGS)


def fictitious_pairs(n: int, seed: int, exclude: Iterable[Pair] = ()) -> list[Pair]:
    """`n` child/parent pairs of invented people, fathers and mothers alternating: every
    full name is distinct, a child and their parent never share a surname (it would give
    the answer away), and no name (nor surname) of a pair in `exclude` occurs."""
    rng = random.Random(seed)
    banned = set()
    for pair in exclude:
        for name in (pair.child, pair.parent):
            banned.add(name)
            banned.update(name.split())
    used: set[str] = set()

    def person(first_names: Sequence[str]) -> str:
        while True:
            surname = _surname(rng)
            name = f"{rng.choice(first_names)} {surname}"
            if surname not in banned and name not in banned and name not in used:
                used.add(name)
                return name

    everyone = FIRST_NAMES["father"] + FIRST_NAMES["mother"]
    pairs = []
    for i in range(n):
        parent_type = ("father", "mother")[i % 2]
        child = person(everyone)
        parent = person(FIRST_NAMES[parent_type])
        while parent.split()[-1] == child.split()[-1]:
            used.discard(parent)
            parent = person(FIRST_NAMES[parent_type])
        pairs.append(Pair(child, parent, parent_type, "child", line=i + 1))
    return pairs
