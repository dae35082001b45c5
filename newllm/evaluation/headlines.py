"""The evaluation line's headline: the base model's perplexity (eval-ppl).

Read by `newllm report` (see `newllm.core.headlines`); `order` places each section
among every line's. Torch-free: the report imports it without the line's library.
"""

from __future__ import annotations

from newllm.core.headlines import Figure, Headline

HEADLINES: tuple[Headline, ...] = (
    Headline(
        name="perplexity",
        order=10,
        title="Base model perplexity",
        stage="eval-ppl",
        figures=(
            Figure("model_id", "model"),
            Figure("split", "split"),
            Figure("tokens", "tokens scored", ",d"),
            Figure("context_length", "context length", "d"),
            Figure("stride", "stride", "d"),
            Figure("documents_mode", "documents"),
            Figure("separator_token", "separator token"),
            Figure("token_ppl", "token PPL", ".3f"),
            Figure("word_ppl", "word PPL", ".3f"),
            Figure("bits_per_byte", "bits per byte", ".4f"),
        ),
        note="Sliding-window perplexity on the split: every token scored once; windows "
             "after the first score only their last `stride` tokens; `separate` scores each "
             "document on its own after the separator, as lm-evaluation-harness does.",
    ),
)
