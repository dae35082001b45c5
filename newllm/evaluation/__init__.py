"""Evaluation: sliding-window perplexity of any scorer kind, and the reversal curse."""
