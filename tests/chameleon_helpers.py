"""Small inputs for the Chameleon tests: a MovieLens folder in RecBole's atomic format."""

from __future__ import annotations

import random
from pathlib import Path

GENRES = ("Action", "Comedy", "Drama", "Romance", "Sci-Fi", "Thriller")


def make_mini_movielens(folder: Path, users: int = 30, movies: int = 40, seed: int = 0) -> Path:
    """`folder/ml-mini.item` and `.inter`: random movies (1-3 genres) and ratings, where each
    user favours one genre (rates its movies high), so golds depend on the profile."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    genres = {}
    for m in range(1, movies + 1):
        genres[m] = rng.sample(GENRES, rng.randint(1, 3))
        items.append(f"{m}\tMovie {m}\t{1980 + m % 20}\t{' '.join(genres[m])}")
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, users + 1):
        favourite = GENRES[u % len(GENRES)]
        for k, m in enumerate(rng.sample(range(1, movies + 1), 25)):
            rating = 5 if favourite in genres[m] else rng.choice([2, 3, 4])
            inter.append(f"{u}\t{m}\t{rating}\t{880000000 + 1000 * u + k}")
    (folder / f"{folder.name}.item").write_text("\n".join(items) + "\n")
    (folder / f"{folder.name}.inter").write_text("\n".join(inter) + "\n")
    return folder
