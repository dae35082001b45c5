"""The Chameleon line's headline: does the projection edit personalize the frozen base?

Read by `newllm report` (see `newllm.core.headlines`); `order` places each section
among every line's. Torch-free: the report imports it without the line's library.
"""

from __future__ import annotations

from newllm.core.headlines import Figure, Headline

HEADLINES: tuple[Headline, ...] = (
    Headline(
        name="chameleon",
        order=40,
        title="Chameleon: tag accuracy of the frozen base on held-out users",
        stage="eval-chameleon",
        figures=(
            Figure("eval_users", "evaluation users", "d"),
            Figure("candidates_mean", "listed genres per question (mean)", ".2f"),
            Figure("majority_accuracy", "baseline: majority class", ".3f"),
            Figure("random_listed_accuracy", "baseline: random listed genre", ".3f"),
            Figure("profile_rule_accuracy", "ceiling: the profile rule", ".3f"),
            Figure("no_profile_listed_accuracy", "no profile (listed genres)", ".3f"),
            Figure("personalized_listed_accuracy", "personalized prompt (listed genres)",
                   ".3f"),
            Figure("edit_listed_accuracy", "projection edit (listed genres)", ".3f"),
            Figure("edit_listed_accuracy_lo", "projection edit, 95% low", ".3f"),
            Figure("edit_listed_accuracy_hi", "projection edit, 95% high", ".3f"),
            Figure("edit_listed_macro_f1", "projection edit, macro-F1", ".3f"),
            Figure("mismatched_listed_accuracy", "null: mismatched-profile directions", ".3f"),
            Figure("edit_minus_personalized_listed_diff", "edit - personalized prompt", "+.3f"),
            Figure("edit_minus_personalized_listed_lo", "edit - personalized, 95% low", "+.3f"),
            Figure("edit_minus_personalized_listed_hi", "edit - personalized, 95% high",
                   "+.3f"),
            Figure("null_users", "null subset: users", "d"),
            Figure("null_draws", "null subset: random-direction draws", "d"),
            Figure("edit_subset_listed_accuracy", "null subset: edit", ".3f"),
            Figure("null_listed_accuracy_mean", "null subset: random directions, mean", ".3f"),
            Figure("null_listed_accuracy_sd", "null subset: random directions, sd", ".3f"),
            Figure("edit_null_rank_listed", "edit's rank among the draws (1 = best)", "d"),
            Figure("edit_null_p_listed", "p among the null draws", ".3f"),
        ),
        note="Primary view: likelihood over the question's own listed genres, mean "
             "log-probability per token; evaluation users are disjoint from the users whose "
             "self-generations gave the directions. The edit adds alpha·proj_p - |beta|·proj_n "
             "to the MLP outputs of layers 21 and 29; the null draws use random directions of "
             "the same norms, alpha, beta and edit ratio; intervals are bootstrap 95%. The "
             "calibrated and all-tags views, generation scoring and the leak check are in "
             "docs/chameleon.md.",
    ),
)
