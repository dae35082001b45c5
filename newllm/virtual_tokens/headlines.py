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
        title="Virtual tokens e*: held-out KL to the full-text teacher (no context / e* / "
              "compressors)",
        stage="eval-compressor",
        figures=(
            Figure("val_pairs", "held-out pairs", "d"),
            Figure("num_virtual", "virtual tokens k", "d"),
            Figure("compression_ratio", "compression ratio", ".1f"),
            Figure("no_context_kl", "KL, no context", ".3f"),
            Figure("e_star_kl", "KL, e*", ".3f"),
            Figure("mean_e_star_kl", "KL, mean training e* (control)", ".3f"),
            Figure("hyper_kl", "KL, hyper", ".3f"),
            Figure("qattn_kl", "KL, qattn", ".3f"),
            Figure("hyper_attn_kl", "KL, hyper + attention match", ".3f"),
            Figure("no_context_top1", "top-1 agreement, no context", ".3f"),
            Figure("e_star_top1", "top-1 agreement, e*", ".3f"),
            Figure("mean_e_star_top1", "top-1 agreement, mean e*", ".3f"),
            Figure("hyper_top1", "top-1 agreement, hyper", ".3f"),
            Figure("qattn_top1", "top-1 agreement, qattn", ".3f"),
            Figure("hyper_attn_top1", "top-1 agreement, hyper + attention", ".3f"),
            Figure("no_context_greedy_len", "greedy agreement, no context", ".2f"),
            Figure("e_star_greedy_len", "greedy agreement, e*", ".2f"),
            Figure("mean_e_star_greedy_len", "greedy agreement, mean e*", ".2f"),
            Figure("hyper_greedy_len", "greedy agreement, hyper", ".2f"),
            Figure("qattn_greedy_len", "greedy agreement, qattn", ".2f"),
            Figure("hyper_attn_greedy_len", "greedy agreement, hyper + attention", ".2f"),
            Figure("hyper_amortization_gap", "amortization gap, hyper", ".3f"),
            Figure("qattn_amortization_gap", "amortization gap, qattn", ".3f"),
            Figure("hyper_attn_amortization_gap", "amortization gap, hyper + attention",
                   ".3f"),
            Figure("hyper_minus_mean_e_star_kl", "KL hyper - mean e*", "+.3f"),
            Figure("qattn_minus_mean_e_star_kl", "KL qattn - mean e*", "+.3f"),
            Figure("hyper_attn_minus_mean_e_star_kl", "KL hyper + attention - mean e*",
                   "+.3f"),
        ),
        note="Mean over held-out pairs (val documents) of KL(teacher || student) in nats on "
             "the follow_text positions, the teacher being the base after [sep, text, "
             "follow_text] (the full text: KL 0 by construction); greedy agreement = leading "
             "tokens of the teacher's greedy continuation reproduced; gap = compressor KL - "
             "e* KL; the mean training e* (the same vectors for every text) is the control a "
             "compressor must beat to carry anything about its own text.",
    ),
)
