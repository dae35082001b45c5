"""The Infini-attention line's headline: the matched-size LMs and the adapter.

Read by `newllm report` (see `newllm.core.headlines`); `order` places each section
among every line's. Torch-free: the report imports it without the line's library.
"""

from __future__ import annotations

from newllm.core.headlines import Figure, Headline

HEADLINES: tuple[Headline, ...] = (
    Headline(
        name="infini",
        order=60,
        title="Infini-attention LMs at matched parameters and tokens: val PPL, memory, "
              "reversal curse",
        stage="infini-report",
        rows=r"([\w-]+?)__",
        row_label="model",
        figures=(
            Figure("parameters", "parameters", ",d"),
            Figure("val_ppl", "val PPL", ".1f"),
            Figure("train_val_ppl", "val PPL (train-lm)", ".1f"),
            Figure("ppl_after_0", "PPL, 0 compressed", ".1f"),
            Figure("ppl_after_max", "PPL, max compressed", ".1f"),
            Figure("passkey_mean", "passkey acc.", ".2f"),
            Figure("injected_forward_ppl", "injected fwd PPL", ".1f"),
            Figure("injected_backward_ppl", "injected bwd PPL", ".1f"),
            Figure("control_forward_ppl", "control fwd PPL", ".1f"),
            Figure("control_backward_ppl", "control bwd PPL", ".1f"),
            Figure("injected_backward_rank_accuracy", "injected bwd rank acc.", ".2f"),
            Figure("control_backward_rank_accuracy", "control bwd rank acc.", ".2f"),
            Figure("segmented_val_ppl", "adapter val PPL (64-token segments)", ".2f"),
            Figure("alpha", "α", ".5f"),
            Figure("after_distill_val_ppl", "PPL after distillation", ".1f"),
        ),
        note="Tiny models (same size, same training tokens) trained by train-lm; val PPL by "
             "eval-ppl (recurrent: segments with memory carried); 'compressed' = segments "
             "written to memory before a fixed late val segment (eval-memory); injected = "
             "pairs whose forward sentence was in the training stream, control = never "
             "shown (for the base: the same two halves, neither shown); rank accuracy is "
             "among 4 distractors (chance 0.20). adapter-* rows: memory on the pretrained "
             "base (train-infini-adapter, ~1k fine-tuning tokens), their val PPL on the "
             "first val documents read in 64-token segments (adapter-base: the unchanged "
             "base read so).",
    ),
)
