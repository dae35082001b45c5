"""The Chameleon line's headline: tag accuracy under the projection edit.

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
            Figure("layers", "edited layers"),
            Figure("majority_accuracy", "majority class", ".3f"),
            Figure("no_profile_lik_accuracy", "no profile (likelihood)", ".3f"),
            Figure("personalized_lik_accuracy", "personalized prompt (likelihood)", ".3f"),
            Figure("edit_lik_accuracy", "projection edit (likelihood)", ".3f"),
            Figure("null_lik_accuracy", "null control: random directions (likelihood)", ".3f"),
            Figure("edit_minus_null_lik_diff", "edit - null (likelihood)", ".3f"),
            Figure("edit_minus_null_lik_lo", "edit - null, 95% low", ".3f"),
            Figure("edit_minus_null_lik_hi", "edit - null, 95% high", ".3f"),
            Figure("no_profile_gen_accuracy", "no profile (generation)", ".3f"),
            Figure("personalized_gen_accuracy", "personalized prompt (generation)", ".3f"),
            Figure("edit_gen_accuracy", "projection edit (generation)", ".3f"),
            Figure("edit_gen_valid_tag_rate", "valid tags, edit (generation)", ".3f"),
            Figure("edit_ratio_realized", "realized edit ratio", ".4f"),
        ),
        note="Accuracy of the tag answer on evaluation users (disjoint from the users whose "
             "self-generations gave the directions); the edit adds alpha·proj_p - |beta|·proj_n "
             "to the edited MLP outputs, the null control the same with random directions; "
             "intervals are paired bootstrap 95%.",
    ),
)
