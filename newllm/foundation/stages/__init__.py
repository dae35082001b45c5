"""The foundation line's stage shells: one module per `newllm <command>`."""
