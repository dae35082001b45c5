"""CVFP artifacts: the phase-1 context blocks, the phase-2 LM, and the token streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from newllm.core.artifacts import load_artifact, save_artifact
from newllm.core.base import state_dict_hash
from newllm.core.data import load_split
from newllm.core.errors import NewllmError
from newllm.core.ppl import build_stream
from newllm.cvfp.model import CVFPLM, CVFPConfig

BLOCKS_KIND = "cvfp-context-blocks"
LM_KIND = "cvfp-lm"


def token_stream(prepared: str | Path, split: str, separator_id: int,
                 base: dict[str, Any], max_tokens: int | None = None) -> torch.Tensor:
    """A split as one stream [sep, doc_1, sep, doc_2, ...] (int64, first `max_tokens`)."""
    docs, _ = load_split(prepared, split, base=base).documents()
    if not docs:
        raise NewllmError(f"{prepared}/{split} has no documents; expected a prepared split.")
    stream, _ = build_stream(docs, separator_id)
    return stream[:max_tokens] if max_tokens is not None else stream


def read_input_embeddings(model: str) -> torch.Tensor | None:
    """The base's input-embedding matrix [vocab, hidden] float32, read alone from its
    model.safetensors (no model is built: seconds less per run); None if the base is stored
    otherwise (GGUF, sharded), where the caller loads the whole base."""
    path = Path(model).expanduser() / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        names = [k for k in handle.keys() if k.endswith("embed_tokens.weight")]  # noqa: SIM118
        return handle.get_tensor(names[0]).float() if len(names) == 1 else None


def blocks_hash(model: CVFPLM) -> str:
    """Identifies the frozen context blocks a cache or an LM was made with."""
    return state_dict_hash(model.context_blocks)


def save_blocks(path: Path, model: CVFPLM, *, params: dict, base: dict,
                extra: dict) -> str:
    digest = blocks_hash(model)
    tensors = {f"context_blocks.{k}": v for k, v in model.context_blocks.state_dict().items()}
    save_artifact(path, tensors, kind=BLOCKS_KIND, stage="phase1-context", params=params,
                  base=base, extra={"config": model.config.as_dict(), "blocks_hash": digest,
                                    **extra})
    return digest


def _config(meta: dict, path: Path, **overrides: Any) -> CVFPConfig:
    try:
        return CVFPConfig(**{**meta["extra"]["config"], **overrides})
    except (KeyError, TypeError) as error:
        raise NewllmError(f"{path} has no valid CVFP config ({error}); re-run the stage "
                          "that wrote it.") from None


def load_blocks(path: str | Path, base: dict, embeddings: torch.Tensor,
                **overrides: Any) -> tuple[CVFPLM, dict]:
    """A CVFPLM holding the phase-1 blocks (token block untrained) and the artifact's meta.
    `overrides` set phase-2 options of the config (head, freeze_embeddings)."""
    artifact = load_artifact(path, kind=BLOCKS_KIND, base=base)
    model = CVFPLM(_config(artifact.meta, artifact.path, **overrides), embeddings)
    prefix = "context_blocks."
    model.context_blocks.load_state_dict(
        {k[len(prefix):]: v for k, v in artifact.tensors.items() if k.startswith(prefix)})
    return model, artifact.meta


def save_lm(path: Path, model: CVFPLM, *, params: dict, base: dict, extra: dict) -> None:
    """Everything but a frozen embedding matrix (that one is the base's, checked by hash)."""
    state = {k: v for k, v in model.state_dict().items()
             if k != "embedding" or not model.config.freeze_embeddings}
    save_artifact(path, state, kind=LM_KIND, stage="phase2-token", params=params, base=base,
                  extra={"config": model.config.as_dict(), "blocks_hash": blocks_hash(model),
                         **extra})


def load_lm(path: str | Path, base: dict, embeddings: torch.Tensor) -> tuple[CVFPLM, dict]:
    artifact = load_artifact(path, kind=LM_KIND, base=base)
    model = CVFPLM(_config(artifact.meta, artifact.path), embeddings)
    model.load_state_dict(artifact.tensors, strict=False)
    missing = set(model.state_dict()) - set(artifact.tensors) - {"embedding"}
    if missing:
        raise NewllmError(f"{artifact.path} lacks {sorted(missing)[0]}; re-run phase2-token.")
    return model.eval(), artifact.meta
