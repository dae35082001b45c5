"""Hidden states as token-like vectors (seeds/002): the hidden state -> token embedding
converter (extract-pairs, train-converter, converter-report, demo-recursive) and, next,
virtual-token (e*) context compression. Stages live in `stages/`; this package holds
the line's models and library code."""


def run_name(layer: int, model_type: str | None = None) -> str:
    """`layer<L>` or `layer<L>_<type>`: how pairs, converters, their metrics and plots are named
    (L is the resolved, non-negative hidden-states index, so -1 and the last layer agree)."""
    return f"layer{layer}" if model_type is None else f"layer{layer}_{model_type}"
