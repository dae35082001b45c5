"""A small hidden state -> token embedding converter (seeds/002 §3).

nanoGPT-style: a config dataclass and a module built from it. Inputs are
standardized per dimension with statistics of the training hidden states
(stored as buffers): a few dimensions of a decoder's residual stream are
hundreds of times larger than the rest, and standardizing lets one learning
rate work at every layer. Standardizing is affine, so `linear` is still exactly
an affine map of the raw hidden state.

Saved as a safetensors artifact (kind `hidden-to-embedding-converter`) whose
metadata `extra` holds the config, the layer it reads and the token its pairs
were read after (`prefix_token_id`, None when read alone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from newllm.core.artifacts import Artifact, load_artifact, save_artifact
from newllm.core.errors import NewllmError
from newllm.virtual_tokens import run_name

CONVERTER_KIND = "hidden-to-embedding-converter"
CONVERTER_FILE = "converter.safetensors"
MODEL_TYPES = ("linear", "mlp")


def converter_dir(out_dir: str | Path, layer: int, model_type: str) -> Path:
    """The folder holding the converter of hidden-state index `layer` and `model_type`."""
    return Path(out_dir) / run_name(layer, model_type)


@dataclass(frozen=True)
class ConverterConfig:
    model_type: str  # linear | mlp
    in_dim: int
    out_dim: int
    hidden_dim: int = 1024  # mlp only

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise NewllmError(f"converter model_type must be one of {', '.join(MODEL_TYPES)}, "
                              f"got {self.model_type!r}.")


class Converter(nn.Module):
    """x [.., in_dim] -> token-embedding-like vector [.., out_dim]."""

    def __init__(self, config: ConverterConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("x_mean", torch.zeros(config.in_dim))
        self.register_buffer("x_scale", torch.ones(config.in_dim))
        if config.model_type == "linear":
            self.net: nn.Module = nn.Linear(config.in_dim, config.out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.GELU(),
                                     nn.Linear(config.hidden_dim, config.out_dim))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Standardize inputs with the mean and std of training hidden states `x` [N, in_dim],
        and start the output at the mean target `y` [N, out_dim] (the output layer's bias),
        so training only has to learn deviations from the mean embedding."""
        self.x_mean.copy_(x.mean(dim=0))
        self.x_scale.copy_(x.std(dim=0, correction=0).clamp_min(1e-6))
        output_layer = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
        output_layer.bias.copy_(y.mean(dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.x_mean) / self.x_scale)


def save_converter(path: str | Path, converter: Converter, *, stage: str,
                   params: dict[str, Any], base: dict[str, Any], layer: int, prefix_id: int | None,
                   tensors: dict[str, torch.Tensor] | None = None,
                   extra: dict[str, Any] | None = None) -> None:
    """Write the converter's weights (plus any extra `tensors`) and config to `path`."""
    weights = {f"converter.{k}": v for k, v in converter.state_dict().items()}
    save_artifact(path, {**weights, **(tensors or {})}, kind=CONVERTER_KIND, stage=stage,
                  params=params, base=base,
                  extra={"config": asdict(converter.config), "layer_index": layer,
                         "prefix_token_id": prefix_id, **(extra or {})})


def load_converter(path: str | Path, base: dict[str, Any],
                   device: str | torch.device = "cpu") -> tuple[Converter, Artifact]:
    """A converter made from `base` (kind and weights hash checked), in eval mode."""
    artifact = load_artifact(path, kind=CONVERTER_KIND, base=base, device=device)
    config = ConverterConfig(**artifact.meta["extra"]["config"])
    converter = Converter(config)
    weights = {k.removeprefix("converter."): v for k, v in artifact.tensors.items()
               if k.startswith("converter.")}
    converter.load_state_dict(weights)
    return converter.to(device).eval().requires_grad_(False), artifact
