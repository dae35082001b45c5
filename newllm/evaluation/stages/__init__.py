"""The evaluation line's stage shells: one module per `newllm <command>`."""
