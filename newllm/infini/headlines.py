"""The Infini-attention line's headlines: val PPL per kind over seeds, the passkey positive
control, the reversal figures of every trained run, and the adapter.

Read by `newllm report` (see `newllm.core.headlines`); `order` places each section
among every line's. Torch-free: the report imports it without the line's library.
"""

from __future__ import annotations

from newllm.core.headlines import Figure, Headline

ROWS = r"([\w-]+?)__"

HEADLINES: tuple[Headline, ...] = (
    Headline(
        name="infini",
        order=60,
        title="Infini-attention LMs at matched parameters and tokens: val PPL, both readings, "
              "over seeds",
        stage="infini-report",
        rows=ROWS,
        row_label="run",
        figures=(
            Figure("parameters", "parameters", ",d"),
            Figure("val_ppl", "val PPL (segments)", ".1f"),
            Figure("val_ppl_seeds", "val PPL over seeds (mean ± sd)"),
            Figure("val_ppl_window", "val PPL (sliding window)", ".1f"),
            Figure("val_ppl_window_seeds", "sliding window over seeds"),
            Figure("val_ppl_last_change", "last epoch's change", "+.1%"),
            Figure("ppl_after_0", "PPL, 0 compressed", ".1f"),
            Figure("ppl_after_max", "PPL, 64 compressed", ".1f"),
            Figure("segmented_val_ppl", "adapter val PPL (64-token segments)", ".2f"),
            Figure("alpha", "α", ".5f"),
            Figure("after_distill_val_ppl", "PPL after distillation", ".1f"),
        ),
        note="Tiny models (same size, same training tokens and passkey share) trained by "
             "train-lm; val PPL on the first val documents, each read from an empty memory "
             "in segments with the memory carried; pythia also in sliding windows as long as "
             "its segment (what it can attend; the seeds' lesson 4). 'compressed' = val "
             "segments written to memory before a fixed late one (eval-memory). adapter-* "
             "rows: memory on the pretrained base (train-infini-adapter, ~1k fine-tuning "
             "tokens), val PPL on the first val documents in 64-token segments.",
    ),
    Headline(
        name="infini_passkey",
        order=61,
        title="Infini-attention: passkey retrieval (the positive control), accuracy [Wilson "
              "95 %] by filler segments between key and question",
        stage="infini-report",
        rows=ROWS,
        row_label="run",
        figures=(
            Figure("passkey_d0", "d = 0"),
            Figure("passkey_d1", "d = 1"),
            Figure("passkey_d2", "d = 2"),
            Figure("passkey_d4", "d = 4"),
            Figure("passkey_d6", "d = 6"),
            Figure("passkey_d12", "d = 12 (untrained)"),
            Figure("memory_grad_k_final", "‖∂answer/∂W_K‖", ".2g"),
            Figure("memory_grad_v_final", "‖∂answer/∂W_V‖", ".2g"),
        ),
        note="One digit key (chance 0.10, 100 trials per distance) in segment 0, asked d "
             "filler segments later, trained on d = 0..6. pythia (32-token segments, no "
             "memory) cannot see the key; pythia_window-256 attends to it up to d = 6. The "
             "gradient columns: the passkey answers' loss reaching the memory layer's K and V "
             "projections after training (0 with the seeds' detached write).",
    ),
    Headline(
        name="infini_reversal",
        order=62,
        title="Infini-attention LMs and the adapters: reversal, answer-only, injected vs "
              "never-injected pairs",
        stage="infini-report",
        rows=ROWS,
        row_label="model",
        figures=(
            Figure("injected_forward_rank_accuracy", "injected fwd acc.", ".2f"),
            Figure("injected_backward_rank_accuracy", "injected bwd acc.", ".2f"),
            Figure("control_forward_rank_accuracy", "control fwd acc.", ".2f"),
            Figure("control_backward_rank_accuracy", "control bwd acc.", ".2f"),
            Figure("injected_forward_answer_margin", "injected fwd margin", "+.2f"),
            Figure("injected_backward_answer_margin", "injected bwd margin", "+.2f"),
            Figure("control_forward_answer_margin", "control fwd margin", "+.2f"),
            Figure("control_backward_answer_margin", "control bwd margin", "+.2f"),
        ),
        note="eval-reversal on every trained run: rank accuracy of the answer name among "
             "same-relation distractors, and its margin: its log-probability after the relation "
             "prompt minus the distractors' mean (nats; familiarity with a name cannot raise "
             "it); injected = pairs whose forward sentence was in the training "
             "text, control = never shown (for the base: the same halves, neither shown).",
    ),
)
