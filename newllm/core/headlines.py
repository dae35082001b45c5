"""The headline figures of every line of research, declared in one place.

`newllm report` prints one table per `Headline` below, in this order, from the
metrics file of the named dvc.yaml stage. A new line of research adds its
section here (and nowhere else): a title, the stage, and the metrics keys with
their labels and formats. A per-row table (one row per layer, say) gives a
`rows` regex whose first group is the row's name: `layer(\\d+)_` reads
`layer15_mlp_top1` as row 15, column key `mlp_top1`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One headline figure: a metrics key, its label and how to print it.

    `fmt` is a `format()` spec: `.3f` for a float, `,d` for an integer, `` for any
    value as text. A figure missing from the metrics file means the metrics are stale.
    """

    key: str
    label: str
    fmt: str = ""


@dataclass(frozen=True)
class Headline:
    """One line of research: a section of the report and a key of `newllm report --json`."""

    name: str  # the --json key: short, stable, snake_case
    title: str
    stage: str  # the dvc.yaml stage (a matrix stage's name without @...) with one metrics file
    figures: tuple[Figure, ...]
    rows: str | None = None  # regex matched at the start of each key; group 1 names the row
    row_label: str = "row"
    note: str = ""  # one sentence under the table in report/README.md


HEADLINES: tuple[Headline, ...] = (
    Headline(
        name="perplexity",
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
        name="converter",
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
    Headline(
        name="chameleon",
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
    Headline(
        name="cvfp",
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
        title="CVFP through eval-ppl (val, documents separately)",
        stage="eval-ppl-cvfp",
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
    Headline(
        name="infini",
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
