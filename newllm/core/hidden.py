"""Hidden states of a decoder at one layer, without running the layers above it.

Layer indices follow Hugging Face's `output_hidden_states` tuple: 0 is the
embedding output, k (0 < k < L) the output of decoder layer k-1, and L the
final hidden state, which HF takes *after* the final norm. Negative indices
count from the end (-1 = L). `hidden_states_at` stops the forward pass with a
hook on the module whose output is that hidden state, so neither the layers
above it nor the LM head are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from newllm.core.errors import NewllmError


class _StopForward(Exception):
    """Raised by the hook to leave the forward pass early, carrying the wanted output."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output


def decoder_of(model: torch.nn.Module) -> Any:
    """The inner decoder (`model.model`: embed_tokens, layers, norm) of a causal LM."""
    decoder = getattr(model, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm")):
        raise NewllmError(f"base model {type(model).__name__} has no model.embed_tokens / "
                          "model.layers / model.norm; expected a Llama-style decoder.")
    return decoder


def resolve_layer_index(layer_index: int, num_layers: int, key: str = "layer_index") -> int:
    """`layer_index` in [-(L+1), L] as a hidden-states index in [0, L]; else NewllmError."""
    if not -(num_layers + 1) <= layer_index <= num_layers:
        raise NewllmError(f"{key} must be in [{-(num_layers + 1)}, {num_layers}] for this "
                          f"{num_layers}-layer model (0 = embeddings, {num_layers} or -1 = "
                          f"last), got {layer_index}.")
    return layer_index % (num_layers + 1)


def resolve_decoder_layers(layers: Sequence[int], num_layers: int, key: str) -> list[int]:
    """Decoder layer indices in [-L, L-1] (0 = the first decoder layer, not the embeddings;
    negative from the last) as sorted distinct indices in [0, L-1]; else a one-line
    NewllmError naming `key` (a hidden-states index is `resolve_layer_index`'s)."""
    for value in layers:
        if not -num_layers <= value < num_layers:
            raise NewllmError(f"{key} must hold decoder layer indices in [{-num_layers}, "
                              f"{num_layers - 1}] for this {num_layers}-layer model (0 = the "
                              f"first decoder layer, -1 = the last), got {value}.")
    return sorted({value % num_layers for value in layers})


def module_for_layer(model: torch.nn.Module, resolved: int) -> torch.nn.Module:
    """The module whose output is hidden state `resolved` (an index in [0, L])."""
    decoder = decoder_of(model)
    num_layers = len(decoder.layers)
    if resolved == 0:
        return decoder.embed_tokens
    if resolved == num_layers:
        return decoder.norm  # HF's last hidden state is post-norm
    return decoder.layers[resolved - 1]


def hidden_states_at(model: torch.nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None, layer_index: int, *,
                     key: str = "layer_index") -> torch.Tensor:
    """Hidden states [B, T, d] at `layer_index`, computing nothing above that layer."""
    decoder = decoder_of(model)
    resolved = resolve_layer_index(layer_index, len(decoder.layers), key)
    return stop_at(module_for_layer(model, resolved), lambda: decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False))


def _output_tensor(_args: tuple, _kwargs: dict, output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def stop_at(module: torch.nn.Module, forward: Callable[[], Any],
            capture: Callable[[tuple, dict, Any], Any] = _output_tensor) -> Any:
    """Run `forward()` only until `module` has returned: a hook raises there, so nothing
    after it is computed. Returns `capture(args, kwargs, output)` of that call of `module`
    (default: its output tensor, the first element of a tuple)."""

    def stop(_module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        raise _StopForward(capture(args, kwargs, output))

    handle = module.register_forward_hook(stop, with_kwargs=True)
    try:
        forward()
    except _StopForward as stopped:
        return stopped.output
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
