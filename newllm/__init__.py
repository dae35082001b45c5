"""newllm: offline-first, reproducible research on the internal representations of LMs."""

__version__ = "0.1.0"
