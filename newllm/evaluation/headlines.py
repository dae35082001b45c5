"""The evaluation line's headlines: the base model's perplexity (eval-ppl), what it knows of
famous child/parent facts in either direction (eval-reversal), and the reversal curse on
fictitious facts injected by fine-tuning (inject-facts).

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
    Headline(
        name="reversal_knowledge",
        order=11,
        title="What the base knows of real pairs, forward and backward (knowledge probe)",
        stage="eval-reversal",
        figures=(
            Figure("pairs", "pairs", "d"),
            Figure("forward_rank_accuracy", "forward rank acc.", ".2f"),
            Figure("forward_rank_accuracy_lo", "fwd lo", ".2f"),
            Figure("forward_rank_accuracy_hi", "fwd hi", ".2f"),
            Figure("backward_rank_accuracy", "backward rank acc.", ".2f"),
            Figure("backward_rank_accuracy_lo", "bwd lo", ".2f"),
            Figure("backward_rank_accuracy_hi", "bwd hi", ".2f"),
            Figure("chance_rank_accuracy", "chance", ".2f"),
            Figure("forward_answer_margin", "fwd margin (nats)", ".2f"),
            Figure("backward_answer_margin", "bwd margin (nats)", ".2f"),
        ),
        note="The shipped famous pairs (people, capitals, inventions): the answer after its "
             "relation prompt ranked among 4 names of the same relation, answer tokens only; "
             "margin = the answer's log-probability minus the distractors' mean; Wilson 95 % "
             "intervals. The two directions ask different names, so this probes knowledge, "
             "not the reversal curse (inject-facts below).",
    ),
    Headline(
        name="reversal_curse",
        order=12,
        title="Reversal curse on fictitious facts fine-tuned into the base (inject-facts)",
        stage="inject-facts",
        rows=r"(\w+?)__",
        row_label="facts",
        figures=(
            Figure("pairs", "pairs", "d"),
            Figure("forward_rank_accuracy", "fwd acc.", ".2f"),
            Figure("backward_rank_accuracy", "bwd acc.", ".2f"),
            Figure("backward_rank_accuracy_lo", "bwd lo", ".2f"),
            Figure("backward_rank_accuracy_hi", "bwd hi", ".2f"),
            Figure("forward_answer_margin", "fwd margin", ".2f"),
            Figure("backward_answer_margin", "bwd margin", ".2f"),
            Figure("backward_answer_margin_lo", "margin lo", ".2f"),
            Figure("backward_answer_margin_hi", "margin hi", ".2f"),
        ),
        note="Invented people; forward_only: trained on \"C's father is P.\" only; both: also "
             "on \"P's child is C.\" (the paper's control); unseen: never trained. Rank "
             "accuracy among 4 same-relation names of the same set (chance 0.20), Wilson 95 %; "
             "margin = answer log-prob minus the distractors' mean (nats, bootstrap 95 %). "
             "Fine-tuned until both trained sets answer forward at ≥ 0.9.",
    ),
)
