"""Hidden states as token-like vectors (seeds/002): the hidden state -> token embedding
converter (extract-pairs, train-converter, converter-report, demo-recursive) and, next,
virtual-token (e*) context compression. Stages live in `newllm/stages/`; this package holds
the line's models and library code."""
