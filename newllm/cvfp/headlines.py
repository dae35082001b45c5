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
        title="CVFP phase 2: the real contexts against controls at the same budget (val)",
        stage="phase2-token",
        rows=r"(cvfp|zeros|shuffled|untrained)__",
        row_label="contexts",
        figures=(
            Figure("val_ppl", "val PPL", ".1f"),
            Figure("val_ppl_sd", "PPL sd", ".1f"),
            Figure("val_accuracy", "val accuracy", ".4f"),
            Figure("val_accuracy_sd", "acc. sd", ".4f"),
            Figure("eval_token_ppl", "eval-ppl token PPL", ".1f"),
            Figure("eval_token_ppl_sd", "eval sd", ".1f"),
        ),
        note="Mean and sd over the seeds of phase2_token.seeds. zeros: no contexts (a bigram "
             "model on e_t); shuffled: another position's contexts; untrained: the blocks "
             "before phase 1. eval-ppl token PPL: documents separately, the first val "
             "documents (phase2_token.eval_tokens). The seeds report val PPL 111.9 / "
             "accuracy 25.6 % after 2M tokens on a GPU.",
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
        note="The LM phase2-token writes (its first seed, real contexts), the whole val "
             "split, the same accounting as the base model's table; each document is read "
             "whole by the recurrence after the separator (no window).",
    ),
    Headline(
        name="cvfp_grid",
        order=52,
        title="CVFP: seeds/003's configurations and the phase-1 objectives, over seeds",
        stage="cvfp-grid-summary",
        rows=r"([a-z0-9_]+?)__",
        row_label="configuration",
        figures=(
            Figure("val_ppl", "val PPL", ".1f"),
            Figure("val_ppl_sd", "PPL sd", ".1f"),
            Figure("val_accuracy", "val accuracy", ".4f"),
            Figure("vs_default", "vs blocks2_500"),
            Figure("val_effective_rank_percent", "val eff. rank %", ".1f"),
            Figure("seed_val_ppl", "seed val PPL", ".1f"),
        ),
        note="Mean and sd over cvfp_grid.seeds at one small CPU budget (cvfp_grid); "
             "'beyond 2 sd': the difference in mean val PPL exceeds twice the larger sd of "
             "the two rows. The seed's figures: 2M tokens on a GPU with GPT-2 embeddings. "
             "Blank: no figure.",
    ),
)
