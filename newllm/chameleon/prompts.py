"""Prompt texts: the self-generation templates and the three evaluation prompts.

Templates take `{profile}` (one line per profile item) and `{question}` (the question's
LaMP-2 input). A tokenizer with a chat template (SmolLM2-Instruct has one) gets the text as
the user turn of a chat; one without gets it as plain text followed by `Answer:`.
"""

from __future__ import annotations

from typing import Any

from newllm.chameleon.data import Question
from newllm.core.errors import NewllmError

# The seed's openings. dvc.yaml passes a template on one line in single quotes, so a line
# break is written `\n` (two characters) and there is no ASCII single quote (hence the
# typographic apostrophe).
PERSONALIZED_TEMPLATE = (
    "You are a personalized assistant. Based on user’s preferences shown in their movie "
    "history below, describe in one or two sentences what this user likes and which tag they "
    "would give the movie.\\nMovie history:\\n{profile}\\n{question}")
NEUTRAL_TEMPLATE = (
    "You are a neutral movie classifier. Analyze objectively, without reference to any "
    "user, in one or two sentences what kind of movie this is.\\n{question}")
PERSONALIZED_PREFIX = "Here are movies this user has tagged:\n{profile}\n\n{question}"


def profile_text(question: Question) -> str:
    return "\n".join(f"- {item.description} -> tag: {item.tag}" for item in question.profile)


def fill(template: str, question: Question, key: str) -> str:
    """`template` with this question's profile and input; a bad placeholder names `key`."""
    try:
        return template.replace("\\n", "\n").format(profile=profile_text(question),
                                                    question=question.input)
    except (KeyError, IndexError, ValueError) as exc:
        raise NewllmError(f"{key} has a placeholder other than {{profile}} and {{question}} "
                          f"({type(exc).__name__}: {exc}); write literal braces as {{{{ }}}}.") \
            from None


def check_template(template: str, key: str, *, needs_profile: bool) -> None:
    """A personalized template must show the profile; a neutral one must not."""
    if not template.strip():
        raise NewllmError(f"{key} is empty; give it a prompt text.")
    if "'" in template or "\n" in template:
        raise NewllmError(f"{key} has a single quote or a line break, which dvc.yaml cannot "
                          "pass (it gives the template on one line in single quotes); write a "
                          "line break as \\n and use ’ or a double quote.")
    if needs_profile and "{profile}" not in template:
        raise NewllmError(f"{key} has no {{profile}} placeholder; a personalized prompt must "
                          "show the user's profile.")
    if not needs_profile and "{profile}" in template:
        raise NewllmError(f"{key} has a {{profile}} placeholder; the neutral prompt must be "
                          "profile-free.")


def as_model_input(tokenizer: Any, text: str, chat: bool) -> str:
    """The text the model reads: a chat user turn plus the assistant opening, or plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return f"{text}\nAnswer:"


def answer_prefix(tokenizer: Any, chat: bool) -> str:
    """What goes between the prompt and a tag when scoring it (plain prompts end 'Answer:')."""
    return "" if chat and getattr(tokenizer, "chat_template", None) else " "


CONDITION_PROMPTS = {
    "no_profile": "{question}",
    "personalized": PERSONALIZED_PREFIX,
}
