"""The virtual-tokens line's headlines: the hidden-state converter and e* / the compressors.

Read by `newllm report` (see `newllm.core.headlines`); `order` places each section
among every line's. Torch-free: the report imports it without the line's library.
"""

from __future__ import annotations

from newllm.core.headlines import Figure, Headline

HEADLINES: tuple[Headline, ...] = (
    Headline(
        name="converter",
        order=20,
        title="Hidden state -> token embedding: held-out top-1 per layer",
        stage="converter-report",
        rows=r"layer(\d+)_",
        row_label="layer",
        figures=(
            Figure("linear_top1", "linear", ".3f"),
            Figure("mlp_top1", "mlp", ".3f"),
            Figure("identity_top1", "identity", ".3f"),
        ),
        note="Share of held-out token ids whose converted hidden state is nearest (cosine) "
             "to their own input embedding; identity is the raw hidden state.",
    ),
    Headline(
        name="virtual_tokens",
        order=30,
        title="Virtual tokens: held-out KL to the full-text teacher, compressors against "
              "their controls",
        stage="eval-compressor",
        figures=(
            Figure("val_pairs", "held-out pairs (val documents)", "d"),
            Figure("train_pairs", "training pairs (KL)", "d"),
            Figure("train_e_star_pairs", "of them with an e* (regression)", "d"),
            Figure("no_context_kl", "KL, no context", ".3f"),
            Figure("e_star_kl", "KL, e* (per-pair oracle, k = 1)", ".3f"),
            Figure("e_star_shuffled_kl", "KL, another pair's e*", ".3f"),
            Figure("mean_e_star_kl", "KL, mean training e*", ".3f"),
            Figure("norm_matched_kl", "KL, norm-matched constant", ".3f"),
            Figure("random_kl", "KL, random vector of e*'s norm", ".3f"),
            Figure("hyper_kl", "KL, hyper (k = 1, seed 0)", ".3f"),
            Figure("hyper_seed1_kl", "KL, hyper (k = 1, seed 1)", ".3f"),
            Figure("hyper_k4_kl", "KL, hyper (k = 4, KL alone)", ".3f"),
            Figure("hyper_over_seeds_minus_shuffled_kl_mean",
                   "hyper - its shuffled output, mean over seeds", "+.3f"),
            Figure("hyper_over_seeds_minus_shuffled_kl_sd", "  sd over seeds", ".3f"),
            Figure("hyper_over_seeds_minus_shuffled_kl_n", "  seeds", "d"),
            Figure("e_star_minus_shuffled_kl", "e* - another pair's e*", "+.3f"),
            Figure("e_star_minus_shuffled_kl_lo", "  95 % interval, low", "+.3f"),
            Figure("e_star_minus_shuffled_kl_hi", "  95 % interval, high", "+.3f"),
            *(Figure(f"{run}_minus_{control}_kl{end}", f"{label} - {what}{tail}", "+.3f")
              for run, label in (("hyper", "hyper"), ("hyper_seed1", "hyper seed 1"),
                                 ("hyper_k4", "hyper k = 4"))
              for control, what in (("shuffled", "its output for another text"),
                                    ("norm_matched", "norm-matched constant"))
              for end, tail in (("", ""), ("_lo", ", 95 % low"), ("_hi", ", 95 % high"))),
        ),
        note="Mean over held-out pairs of KL(teacher || student) in nats on the follow_text "
             "positions, the teacher being the base after [sep, text, follow_text]; "
             "differences are paired over pairs, intervals are bootstrap 95 % resampling "
             "documents; a compressor carries something about its own text only where its "
             "difference to its output for another text excludes 0.",
    ),
    Headline(
        name="virtual_token_capacity",
        order=31,
        title="Virtual tokens: texts crammed into k vectors, share reproduced exactly",
        stage="reconstruct-capacity",
        rows=r"(k\d+)_",
        row_label="k",
        figures=(
            *(Figure(f"len{n}_exact", f"length {n}", ".2f") for n in (8, 16, 32)),
        ),
        note="Share of val texts that greedy decoding after [sep, e*] reproduces exactly "
             "within the step cap (the first token included).",
    ),
)
