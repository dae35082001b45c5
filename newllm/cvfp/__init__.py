"""CVFP: the context-vector fixed-point recurrent LM (seeds/001, seeds/003)."""
