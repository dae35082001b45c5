"""The virtual_tokens line's stage shells: one module per `newllm <command>`."""
