"""The plumbing every stage shares: CLI, params, errors, artifacts, base model, data, training."""
