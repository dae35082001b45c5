"""The CVFP line's headlines: phase 2, CVFP through eval-ppl, and the seeds' grid.

Read by `newllm report` (see `newllm.core.headlines`); `order` places each section
among every line's. Torch-free: the report imports it without the line's library.
"""

from __future__ import annotations

from newllm.core.headlines import Figure, Headline

HEADLINES: tuple[Headline, ...] = (
    Headline(
        name="cvfp",
        order=50,
        title="CVFP context-vector fixed-point LM (phase 2, val)",
        stage="phase2-token",
        figures=(
            Figure("train_tokens", "train tokens", ",d"),
            Figure("epochs", "epochs", "d"),
            Figure("val_ppl", "val PPL", ".1f"),
            Figure("val_accuracy", "val accuracy", ".4f"),
            Figure("parameters_trainable", "trainable parameters", ",d"),
        ),
        note="The TokenBlock alone trained on the frozen blocks' exact contexts; the seeds "
             "report val PPL 111.9 / accuracy 25.6 % after 2M tokens on a GPU.",
    ),
    Headline(
        name="cvfp_perplexity",
        order=51,
        title="CVFP through eval-ppl (val, documents separately)",
        stage="eval-ppl-cvfp@separate",
        figures=(
            Figure("tokens", "tokens scored", ",d"),
            Figure("token_ppl", "token PPL", ".2f"),
            Figure("word_ppl", "word PPL", ".2f"),
            Figure("bits_per_byte", "bits per byte", ".4f"),
        ),
        note="Same accounting as the base model's table; each document is read whole by the "
             "recurrence after the separator (no window).",
    ),
    Headline(
        name="cvfp_grid",
        order=52,
        title="CVFP: seeds/003's configurations at one token budget",
        stage="cvfp-grid",
        rows=r"([a-z0-9_]+?)__",
        row_label="configuration",
        figures=(
            Figure("val_ppl", "val PPL", ".1f"),
            Figure("val_accuracy", "val accuracy", ".4f"),
            Figure("seed_val_ppl", "seed val PPL", ".1f"),
            Figure("seed_val_accuracy", "seed val accuracy", ".3f"),
        ),
        note="Ours: 3k phase-1 and 6k phase-2 tokens per configuration on a CPU; the seed's: "
             "2M tokens on a GPU with GPT-2 embeddings. Blank: the seed gives no figure.",
    ),
)
