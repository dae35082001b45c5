"""LaMP-2-format personalization tasks: the published JSON files, or one built from MovieLens.

A task is a list of questions, one per user: the user's profile (items with a description
and the tag the user gave them), a question input asking for the tag of a new item, and the
gold tag. LaMP-2 files (`*_questions.json` with `id`, `input`, `profile` [{`id`,
`description`, `tag`}], and the `*_outputs.json` beside it with `golds` [{`id`, `output`}])
are read as they are. The embedded default is built from MovieLens-100k (RecBole atomic
files): see `build_movielens_task` for the gold rule. Users are split, seeded, into direction
users (whose generations give the directions) and evaluation users.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from newllm.core.artifacts import read_json
from newllm.core.errors import NewllmError

# The 15 tags of LaMP-2 (movie tagging), used when a question's input does not list them.
LAMP2_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
              "dark comedy", "classic", "psychology", "fantasy", "romance",
              "thought-provoking", "social commentary", "violence", "true story")
QUESTION_TEXT = ("Which tag does this movie relate to among the following tags? Just answer "
                 "with the tag name without further explanation. tags: [{tags}] "
                 "description: {description}")


@dataclass(frozen=True)
class ProfileItem:
    id: str
    description: str
    tag: str


@dataclass(frozen=True)
class Question:
    id: str
    user: str
    input: str  # the LaMP-2 question text (tags listed, then the item's description)
    profile: tuple[ProfileItem, ...]
    gold: str
    # what a profile-free predictor may know about the item (MovieLens: its genres); None
    # when the source gives nothing but the text (LaMP-2)
    item_key: str | None = None


@dataclass(frozen=True)
class Task:
    source: str
    tags: tuple[str, ...]
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Split:
    direction: tuple[Question, ...]
    evaluation: tuple[Question, ...]


# --- LaMP-2 JSON -------------------------------------------------------------------------------

def _read_json(path: Path) -> object:
    return read_json(path, "a LaMP-2 JSON file")


def outputs_path_for(questions: Path) -> Path:
    """LaMP names a split's files `<split>_questions.json` and `<split>_outputs.json`."""
    if "questions" not in questions.name:
        raise NewllmError(f"{questions}: a LaMP-2 questions file must have 'questions' in its "
                          "name (its golds are read from the same name with 'outputs').")
    return questions.with_name(questions.name.replace("questions", "outputs"))


def _tags_in_input(text: str) -> tuple[str, ...] | None:
    match = re.search(r"tags:\s*\[([^\]]*)\]", text)
    if match is None:
        return None
    return tuple(t.strip() for t in match.group(1).split(",") if t.strip())


def read_lamp2(questions_path: str | Path) -> Task:
    """Read a LaMP-2 questions file and its outputs file into a Task."""
    questions_path = Path(questions_path)
    outputs_path = outputs_path_for(questions_path)
    raw_questions = _read_json(questions_path)
    raw_outputs = _read_json(outputs_path)
    if not isinstance(raw_questions, list):
        raise NewllmError(f"{questions_path}: expected a JSON list of questions.")
    golds_list = raw_outputs.get("golds") if isinstance(raw_outputs, dict) else None
    if not isinstance(golds_list, list):
        raise NewllmError(f"{outputs_path}: expected a JSON object with a 'golds' list.")
    golds = {}
    for i, row in enumerate(golds_list):
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("output"), str):
            raise NewllmError(f"{outputs_path}: golds[{i}] needs an 'id' and a string "
                              "'output'.")
        golds[str(row["id"])] = row["output"].strip()
    questions = []
    tags: tuple[str, ...] | None = None
    for i, row in enumerate(raw_questions):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or "id" not in row:
            raise NewllmError(f"{questions_path}: question {i} needs an 'id' and a string "
                              "'input'.")
        qid = str(row["id"])
        profile_rows = row.get("profile")
        if not isinstance(profile_rows, list) or not profile_rows:
            raise NewllmError(f"{questions_path}: question {qid} has an empty profile; "
                              "expected at least one (description, tag) item.")
        profile = []
        for j, item in enumerate(profile_rows):
            if not isinstance(item, dict) or not isinstance(item.get("description"), str) \
                    or not isinstance(item.get("tag"), str):
                raise NewllmError(f"{questions_path}: question {qid}, profile item {j} needs a "
                                  "string 'description' and 'tag'.")
            profile.append(ProfileItem(str(item.get("id", j)), item["description"].strip(),
                                       item["tag"].strip()))
        if qid not in golds:
            raise NewllmError(f"{outputs_path} has no gold for question {qid}.")
        listed = _tags_in_input(row["input"]) or LAMP2_TAGS
        if tags is None:
            tags = listed
        questions.append(Question(qid, qid, row["input"].strip(), tuple(profile), golds[qid]))
    if not questions:
        raise NewllmError(f"{questions_path} holds no questions.")
    assert tags is not None
    for q in questions:
        if q.gold not in tags:
            raise NewllmError(f"{outputs_path}: the gold of question {q.id} is {q.gold!r}, "
                              f"not one of the task's tags ({', '.join(tags)}).")
    return Task(str(questions_path), tags, tuple(questions))


# --- MovieLens-100k -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Movie:
    id: str
    title: str
    year: str
    genres: tuple[str, ...]

    def description(self) -> str:
        year = f" ({self.year})" if self.year else ""
        return f"{self.title}{year}; genres: {', '.join(self.genres)}"


def _read_atomic(path: Path) -> list[dict[str, str]]:
    """A RecBole atomic file: tab-separated, a header of `name:type` columns."""
    if not path.is_file():
        raise NewllmError(f"{path} does not exist; expected a RecBole atomic file "
                          "(run `newllm fetch-assets` for MovieLens-100k).")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader, [])]
        return [dict(zip(header, row, strict=False)) for row in reader if row]


def read_movielens(folder: str | Path) -> tuple[dict[str, Movie], list[tuple[str, str, float,
                                                                             float]]]:
    """Movies and (user, item, rating, timestamp) rows of a RecBole ml-100k folder."""
    folder = Path(folder)
    name = folder.name
    movies = {}
    for row in _read_atomic(folder / f"{name}.item"):
        genres = tuple(g for g in row.get("class", "").split() if g != "unknown")
        movies[row["item_id"]] = Movie(row["item_id"], row.get("movie_title", "").strip(),
                                       row.get("release_year", "").strip(), genres)
    ratings = []
    for row in _read_atomic(folder / f"{name}.inter"):
        try:
            ratings.append((row["user_id"], row["item_id"], float(row["rating"]),
                            float(row["timestamp"])))
        except (KeyError, ValueError):
            raise NewllmError(f"{folder / (name + '.inter')}: a row without a numeric rating "
                              f"and timestamp: {row}.") from None
    return movies, ratings


def genre_counts(movies: list[Movie]) -> Counter[str]:
    """c(g): how many of these movies have genre g."""
    return Counter(g for m in movies for g in m.genres)


def gold_tag(genres: tuple[str, ...], counts: Counter[str]) -> str | None:
    """The gold rule: the movie's genre the user's liked movies have most often.

    None when it is not unique (a tie at the top) or no genre of the movie occurs at all,
    so every gold is decided by the profile.
    """
    scored = sorted(((counts[g], g) for g in genres), reverse=True)
    if not scored or scored[0][0] == 0 or (len(scored) > 1 and scored[1][0] == scored[0][0]):
        return None
    return scored[0][1]


def favourite_genre(genres: tuple[str, ...], counts: Counter[str],
                    popularity: Counter[str]) -> str:
    """A profile item's tag: its genre the user likes most; ties go to the genre more liked by
    all users, then alphabetical order."""
    return min(genres, key=lambda g: (-counts[g], -popularity[g], g))


def build_movielens_task(folder: str | Path, *, high_rating: float, max_profile_items: int,
                         min_profile_items: int, seed: int) -> Task:
    """A LaMP-2-format task from MovieLens: per user, one question whose gold needs the profile.

    A user's liked movies are those rated >= `high_rating` (with a known genre). The question
    is one liked movie with >= 2 genres, picked in a seeded order; the profile is the user's
    `max_profile_items` most recent other liked movies, each tagged with its genre the profile
    favours most. The gold is the question movie's genre that occurs in most profile movies
    (`gold_tag`); a movie where that is a tie is skipped, and a user with no such movie or
    fewer than `min_profile_items` profile movies is left out.
    """
    folder = Path(folder)
    movies, ratings = read_movielens(folder)
    liked: dict[str, list[tuple[float, str]]] = {}
    for user, item, rating, stamp in ratings:
        movie = movies.get(item)
        if rating >= high_rating and movie is not None and movie.genres:
            liked.setdefault(user, []).append((stamp, item))
    popularity = genre_counts([movies[i] for rows in liked.values() for _, i in rows])
    tags = tuple(sorted({g for m in movies.values() for g in m.genres}))
    questions = []
    for user in sorted(liked, key=lambda u: (len(u), u)):
        history = [i for _, i in sorted(liked[user])]  # oldest first; ties by item id
        candidates = [i for i in history if len(movies[i].genres) >= 2]
        random.Random(f"{seed}:{user}").shuffle(candidates)
        for item in candidates:
            others = [i for i in history if i != item]
            profile_ids = others[-max_profile_items:]
            if len(profile_ids) < min_profile_items:
                break
            counts = genre_counts([movies[i] for i in profile_ids])
            gold = gold_tag(movies[item].genres, counts)
            if gold is None:
                continue
            profile = tuple(ProfileItem(i, movies[i].description(),
                                        favourite_genre(movies[i].genres, counts, popularity))
                            for i in profile_ids)
            text = QUESTION_TEXT.format(tags=", ".join(tags),
                                        description=movies[item].description())
            questions.append(Question(f"{user}-{item}", user, text, profile, gold,
                                      item_key=",".join(movies[item].genres)))
            break
    if not questions:
        raise NewllmError(f"{folder}: no user has a liked movie whose gold tag the profile "
                          "decides; lower chameleon_data.min_profile_items or high_rating.")
    return Task(str(folder), tags, tuple(questions))


def load_task(data: str | Path, *, high_rating: float, max_profile_items: int,
              min_profile_items: int, seed: int) -> Task:
    """A LaMP-2 questions JSON file, or a RecBole MovieLens folder."""
    path = Path(data)
    if path.is_dir():
        return build_movielens_task(path, high_rating=high_rating,
                                    max_profile_items=max_profile_items,
                                    min_profile_items=min_profile_items, seed=seed)
    if path.suffix == ".json":
        task = read_lamp2(path)
        # the prompt shows at most max_profile_items items, the most recent (last) ones
        return Task(task.source, task.tags, tuple(
            Question(q.id, q.user, q.input, q.profile[-max_profile_items:], q.gold, q.item_key)
            for q in task.questions))
    raise NewllmError(f"chameleon_data.data '{data}' is neither a MovieLens folder (RecBole "
                      "atomic files) nor a LaMP-2 questions .json file.")


def split_users(task: Task, num_direction_users: int, num_eval_users: int, seed: int) -> Split:
    """Seeded split by user: the first users of a shuffled order give directions, the next
    ones are evaluated; no user is in both."""
    users = sorted({q.user for q in task.questions})
    need = num_direction_users + num_eval_users
    if len(users) < need:
        raise NewllmError(f"{task.source} has {len(users)} usable users, fewer than "
                          f"chameleon_data.num_direction_users + num_eval_users = {need}.")
    random.Random(seed).shuffle(users)
    direction = set(users[:num_direction_users])
    evaluation = set(users[num_direction_users:need])
    return Split(tuple(q for q in task.questions if q.user in direction),
                 tuple(q for q in task.questions if q.user in evaluation))


def class_balance(questions: tuple[Question, ...], tags: tuple[str, ...]) -> dict[str, float]:
    counts = Counter(q.gold for q in questions)
    return {t: counts[t] / len(questions) for t in tags}


def majority_accuracy(questions: tuple[Question, ...]) -> float:
    """Accuracy of always answering the most frequent gold tag of these questions."""
    return Counter(q.gold for q in questions).most_common(1)[0][1] / len(questions)


def profile_free_oracle_accuracy(questions: tuple[Question, ...]) -> float | None:
    """Best accuracy of any rule that sees the item (its genres) but not the profile, fitted on
    these very questions (so an upper bound): per item key, its most frequent gold. None when
    the source gives no item key (LaMP-2)."""
    if any(q.item_key is None for q in questions):
        return None
    by_key: dict[str, Counter[str]] = {}
    for q in questions:
        by_key.setdefault(str(q.item_key), Counter())[q.gold] += 1
    return sum(c.most_common(1)[0][1] for c in by_key.values()) / len(questions)


def candidates(question: Question, tags: tuple[str, ...]) -> tuple[str, ...]:
    """The tags a question offers as answers: a MovieLens question's own genres (its
    description lists them and the gold is one of them), else every tag of the task (LaMP-2
    lists them all)."""
    if question.item_key is None:
        return tags
    return tuple(question.item_key.split(","))


def _profile_genres(item: ProfileItem) -> tuple[str, ...]:
    """The genres a profile line shows ("...; genres: A, B"), else its tag alone."""
    match = re.search(r"; genres: (.+)$", item.description)
    return tuple(g.strip() for g in match.group(1).split(",")) if match else (item.tag,)


def profile_rule(question: Question, tags: tuple[str, ...]) -> str:
    """The answer of a rule that reads the profile: the listed candidate the profile's items
    show most often (their genres on MovieLens, their tags on LaMP-2); ties go to the first
    candidate. On MovieLens this is the gold rule itself, so it scores 1.0: the ceiling."""
    counts = Counter(g for item in question.profile for g in _profile_genres(item))
    listed = candidates(question, tags)
    return max(listed, key=lambda c: (counts[c], -listed.index(c)))


def random_listed_accuracy(questions: tuple[Question, ...], tags: tuple[str, ...]) -> float:
    """Expected accuracy of answering a uniformly random listed candidate (exact)."""
    return sum(1 / len(candidates(q, tags)) for q in questions) / len(questions)


def tag_key(tag: str) -> str:
    """A tag as a metrics-key fragment: `Children's` -> `children_s`."""
    return re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")
