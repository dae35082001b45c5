"""The one way to load a base model and its tokenizer, and to name them in provenance.

`base.model` may be
- a local Hugging Face model directory (the embedded default is the one
  `fetch-assets` converts into `data/assets/smollm2-135m`),
- a `.gguf` file (dequantized by transformers; slow to load, convert it once),
- a model id already in the local Hugging Face cache (never downloaded).

Identity for provenance: a sha256 over the weight files (so a copied folder is
still the same model) and a sha256 over the tokenizer's vocabulary. The weights
hash is cached per user (see `cache_dir`), keyed by each file's path, size and
times, so a load reads the weights once instead of twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from newllm.core.errors import NewllmError
from newllm.core.params import param
from newllm.core.runtime import resolve_device, resolve_dtype, warn_if_slow_bfloat16

ASSET_MARKER = "newllm_asset.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
WEIGHTS_CACHE_FILE = "weights_hashes.json"
_TRUE = ("1", "true", "yes", "on")


def prepare_transformers() -> None:
    """Offline and quiet transformers; call before loading a model or tokenizer.

    Done here rather than at import so that importing newllm changes no environment.
    """
    # No hub: never let transformers try the network (an explicit setting wins).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, when imported; if something imported it
    # first, tell the already-loaded module as well
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and os.environ["HF_HUB_OFFLINE"].lower() in _TRUE:
        constants.HF_HUB_OFFLINE = True
    # our own progress bars are enough; transformers' weight-loading bars are noise in logs
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@dataclass(frozen=True)
class BaseInfo:
    """Who the base model is, as recorded in every artifact made from it."""

    model_id: str
    weights_hash: str | None
    tokenizer_hash: str
    num_layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tokenizer_only(self) -> dict[str, Any]:
        """Provenance for artifacts that depend on the tokenizer alone (prepared data)."""
        return {"model_id": self.model_id, "weights_hash": None,
                "tokenizer_hash": self.tokenizer_hash}


@dataclass
class BaseModel:
    model: torch.nn.Module
    tokenizer: Any
    info: BaseInfo
    device: torch.device

    def input_embeddings(self) -> torch.Tensor:
        """The input embedding matrix [vocab, hidden] as a float32 CPU copy, outside autograd:
        what a line trains against, or reads rows from, while the base stays untouched."""
        return self.model.get_input_embeddings().weight.detach().float().cpu()


@dataclass(frozen=True)
class _Source:
    """Where a model lives: a folder, or a GGUF file in a folder."""

    model_id: str
    folder: Path
    gguf_file: str | None


def _resolve(model: str) -> _Source:
    path = Path(model).expanduser()  # `base.model: ~/models/x` in params.yaml
    if path.is_file() and path.suffix == ".gguf":
        return _Source(f"{path.name}", path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise NewllmError(f"base.model '{model}' is a folder without config.json; expected "
                              "a Hugging Face model directory (run `newllm fetch-assets` for "
                              "the default).")
        marker = path / ASSET_MARKER
        model_id = json.loads(marker.read_text())["model_id"] if marker.exists() else path.name
        return _Source(model_id, path, None)
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or (
        model.count("/") > 1)
    if not looks_like_path:
        try:
            from huggingface_hub import snapshot_download

            # HF_HUB_CACHE is read now, not at import, so a cache set later is honoured
            folder = snapshot_download(model, local_files_only=True,
                                       cache_dir=os.environ.get("HF_HUB_CACHE"))
            return _Source(model, Path(folder), None)
        except Exception:
            pass
    raise NewllmError(f"base.model '{model}' is not a local model directory, a .gguf file or a "
                      "model id in the local Hugging Face cache (no hub is reachable; run "
                      "`newllm fetch-assets` for the default model).")


def _read_into(digest: Any, path: Path) -> None:
    """Feed a file to a hash in 4 MiB chunks (weights are far too big to read at once)."""
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    _read_into(digest, path)
    return digest.hexdigest()


def hash_files(paths: list[Path]) -> str:
    """One sha256 over the files' names and contents, in name order (folder-independent)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        _read_into(digest, path)
    return digest.hexdigest()


def cache_dir() -> Path:
    """newllm's per-user cache: $NEWLLM_CACHE_DIR, else $XDG_CACHE_HOME/newllm, ~/.cache/newllm."""
    if os.environ.get("NEWLLM_CACHE_DIR"):
        return Path(os.environ["NEWLLM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "newllm"


def _file_stamps(files: list[Path]) -> list[list[Any]]:
    """What must stay the same for a cached hash to hold: name, path, size, mtime, ctime.

    ctime too because `touch -d` or `cp -p` can put an old mtime on new content, and
    nothing can set a ctime back.
    """
    stamps = []
    for path in sorted(files, key=lambda p: p.name):
        stat = path.stat()
        # the name goes into the hash; the resolved path is where the bytes are (a HF cache
        # snapshot links each name to a blob)
        stamps.append([path.name, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                       stat.st_ctime_ns])
    return stamps


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: start afresh
    return cache if isinstance(cache, dict) else {}


def cached_hash_files(files: list[Path]) -> str:
    """`hash_files`, remembered in the user cache until any file's path, size or times change."""
    from newllm.core.artifacts import write_json

    stamps = _file_stamps(files)
    key = "\n".join(stamp[1] for stamp in stamps)
    cache_file = cache_dir() / WEIGHTS_CACHE_FILE
    cache = _read_cache(cache_file)
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("files") == stamps:
        return str(entry["sha256"])
    digest = hash_files(files)
    # forget models that are gone, so the file stays small
    cache = {k: v for k, v in cache.items() if all(Path(p).exists() for p in k.split("\n"))}
    cache[key] = {"files": stamps, "sha256": digest}
    with contextlib.suppress(OSError, NewllmError):  # an unwritable cache costs a re-hash
        write_json(cache_file, cache)
    return digest


def _weights_hash(source: _Source) -> str:
    if source.gguf_file:
        return cached_hash_files([source.folder / source.gguf_file])
    files = [p for p in source.folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    if not files:
        raise NewllmError(f"base.model '{source.folder}' holds no weight files.")
    return cached_hash_files(files)


def tokenizer_hash(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def state_dict_hash(model: torch.nn.Module) -> str:
    """Hash of the in-memory weights, for checking that a frozen model stayed frozen."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # hashlib reads the numpy buffer in place (no .tobytes() copy); reshape(-1) lets
        # a 0-d tensor be viewed as bytes too
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy())
    return digest.hexdigest()


# the vocabulary files one of which a tokenizer folder holds (fast, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
# tokenizer_config.json classes that are the generic fast tokenizer over tokenizer.json
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _generic_fast_tokenizer(source: _Source) -> bool:
    """Whether the folder's tokenizer is the generic fast one over its tokenizer.json."""
    config = source.folder / "tokenizer_config.json"
    if source.gguf_file is not None or not (source.folder / "tokenizer.json").is_file() \
            or not config.is_file():
        return False
    try:
        settings = json.loads(config.read_text())
    except ValueError:
        return False
    # remote code (auto_map) would make AutoTokenizer pick another class
    return settings.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES \
        and "auto_map" not in settings


def load_tokenizer(model: str) -> tuple[Any, BaseInfo]:
    """The base tokenizer alone (prepare-data needs nothing else)."""
    prepare_transformers()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = _resolve(model)
    if source.gguf_file is None and not any((source.folder / name).is_file()
                                            for name in TOKENIZER_FILES):
        raise NewllmError(f"base.model '{model}': the folder {source.folder} has no tokenizer "
                          f"files (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
                          "beside the weights (tokenizer.save_pretrained) or name a folder "
                          "that has one.")
    try:
        if _generic_fast_tokenizer(source):
            # the class AutoTokenizer would pick, loaded directly: AutoTokenizer first imports
            # the model's configuration machinery (~1.5 s, in every stage that needs only text)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(source.folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.folder,
                                                      gguf_file=source.gguf_file)
    except Exception as exc:
        raise NewllmError(f"base.model '{model}': could not load its tokenizer "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from None
    info = BaseInfo(source.model_id, None, tokenizer_hash(tokenizer), vocab_size=len(tokenizer))
    return tokenizer, info


def load_base(model: str, *, dtype: str = "float32", device: str = "auto") -> BaseModel:
    """Load a frozen causal LM (eval mode, no grad) with its tokenizer and identity."""
    tokenizer, tok_info = load_tokenizer(model)  # also prepares transformers
    from transformers import AutoModelForCausalLM

    source = _resolve(model)
    torch_device = resolve_device(device)
    if dtype == "bfloat16":
        warn_if_slow_bfloat16(torch_device, "inference")
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            source.folder, gguf_file=source.gguf_file, dtype=resolve_dtype(dtype))
    except Exception as exc:
        raise NewllmError(f"base.model '{model}': could not load the model "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from None
    lm.eval().requires_grad_(False)
    lm.to(torch_device)
    config = lm.config
    info = BaseInfo(
        model_id=source.model_id,
        weights_hash=_weights_hash(source),
        tokenizer_hash=tok_info.tokenizer_hash,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
    )
    return BaseModel(lm, tokenizer, info, torch_device)


@dataclass
class BaseParams:
    """params.yaml group `base`: which base model, in what precision, on which device."""

    group = "base"
    model: str = param("data/assets/smollm2-135m",
                       "Base model: a local HF directory, a .gguf file or a cached HF model id.")
    dtype: str = param("float32", "Weights/compute dtype.", choices=("float32", "bfloat16",
                                                                     "float16"))
    device: str = param("auto", "Device: auto picks cuda, then mps, then cpu.",
                        choices=("auto", "cpu", "cuda", "mps"))
    separator_token: str = param("auto", "Token between documents (and before a lone token "
                                 "in extract-pairs): auto = the model's document-boundary "
                                 "token (<|endoftext|> if the vocabulary has it, else BOS, "
                                 "else EOS), or a token string of the vocabulary.")

    def load(self) -> BaseModel:
        return load_base(self.model, dtype=self.dtype, device=self.device)
