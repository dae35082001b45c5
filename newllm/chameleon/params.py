"""The params group the Chameleon stages share: which task, which users, how prompts look."""

from __future__ import annotations

from dataclasses import dataclass

from newllm.chameleon.data import Split, Task, load_task, split_users
from newllm.core.params import param


@dataclass
class ChameleonDataParams:
    group = "chameleon_data"
    data: str = param("data/assets/ml-100k", "A MovieLens folder (RecBole atomic files; the "
                      "task is built from it) or a LaMP-2 questions .json file (its outputs "
                      "file beside it).")
    high_rating: float = param(4.0, "MovieLens: ratings at or above this are the movies a user "
                               "likes (profile and question).", min=0)
    max_profile_items: int = param(6, "Profile items shown in a prompt (the most recent).",
                                   min=1)
    min_profile_items: int = param(4, "MovieLens: users with fewer liked movies besides the "
                                   "question are left out.", min=1)
    num_direction_users: int = param(100, "Users whose self-generations give the directions.",
                                     min=1)
    num_eval_users: int = param(300, "Other users the editing is evaluated on.", min=1)
    chat_template: bool = param(True, "Give prompts as a chat user turn when the tokenizer has "
                                "a chat template (else plain text ending 'Answer:').")
    split_seed: int = param(0, "Seed of the question choice and the user split.", min=0)

    def task(self) -> Task:
        return load_task(self.data, high_rating=self.high_rating,
                         max_profile_items=self.max_profile_items,
                         min_profile_items=self.min_profile_items, seed=self.split_seed)

    def split(self, task: Task) -> Split:
        return split_users(task, self.num_direction_users, self.num_eval_users, self.split_seed)
