"""What every fine-tuning method shares: finding layers by name, the classification head, freezing, counting."""

from __future__ import annotations

import torch

from tuneforge.errors import ConfigError
from tuneforge.pretrained import block_index

# Top-level children of a *ForSequenceClassification model that are created fresh for the task and so must
# train (and be saved) with any adapter: BERT/RoBERTa/ELECTRA "classifier", DistilBERT's extra
# "pre_classifier", DeBERTa's fresh "pooler". BERT's own pooler lives inside `bert.` and is pretrained.
HEAD_MODULE_NAMES = ("pre_classifier", "pooler", "classifier", "score")

# Written next to the adapter weights: what the adapter is and what it needs to be rebuilt.
METADATA_FILE = "tuneforge_adapter.json"


def head_module_names(model: torch.nn.Module) -> list[str]:
    """The task head's top-level module names of a plain transformers classifier (e.g. ``["classifier"]``)."""
    children = dict(model.named_children())
    names = [name for name in HEAD_MODULE_NAMES if name in children]
    if "classifier" not in names and "score" not in names:
        raise ConfigError(
            f"finetune.method: {type(model).__name__} has no 'classifier' head module; adapters need an "
            "AutoModelForSequenceClassification model"
        )
    return names


def freeze_lower_layers(model: torch.nn.Module, count: int) -> None:
    """Fix the embeddings and the ``count`` blocks nearest the input (``finetune.freeze_layers``).

    With nothing trainable below them, backpropagation stops at the first trainable block: the frozen
    blocks cost a forward pass only.
    """
    blocks = {index for name, _ in model.named_parameters() if (index := block_index(name)) is not None}
    if count >= len(blocks):
        raise ConfigError(
            f"finetune.freeze_layers: {count} would freeze every block; {type(model).__name__} has "
            f"{len(blocks)} numbered layers, so at most {max(len(blocks) - 1, 0)}"
        )
    for name, param in model.named_parameters():
        index = block_index(name)
        if "embeddings" in name or (index is not None and index < count):
            param.requires_grad_(False)


def matches_suffix(module_name: str, suffix: str) -> bool:
    """peft's rule for a list of target modules: the whole name, or a dotted suffix of it."""
    return module_name == suffix or module_name.endswith("." + suffix)


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names of the body's Linear layers (the head excluded: it trains in full anyway)."""
    heads = set(head_module_names(model))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".", 1)[0] not in heads
    ]


def describe_linear_layers(names: list[str]) -> str:
    """A short menu of valid suffixes: ``query, key, value, dense (output.dense, intermediate.dense, ...)``."""
    last: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        two = ".".join(parts[-2:])
        options = last.setdefault(parts[-1], [])
        if two not in options:
            options.append(two)
    shown = []
    for leaf, options in last.items():
        # A leaf name like "dense" appears in several places; show the suffixes that tell them apart.
        shown.append(f"{leaf} ({', '.join(options)})" if len(options) > 1 else leaf)
    return ", ".join(shown)


def check_suffixes(model: torch.nn.Module, suffixes: list[str], key: str) -> None:
    """Raise a ConfigError naming ``key`` for every suffix that selects no Linear layer of the body."""
    linear = linear_layer_names(model)
    modules = dict(model.named_modules())
    for suffix in suffixes:
        if any(matches_suffix(name, suffix) for name in linear):
            continue
        others = [name for name in modules if matches_suffix(name, suffix)]
        if others:
            kind = type(modules[others[0]]).__name__
            problem = f"{suffix!r} names a {kind}, not a Linear layer"
        else:
            problem = f"{suffix!r} matches no Linear layer of the model"
        raise ConfigError(f"{key}: {problem} (it has: {describe_linear_layers(linear)})")


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once even when shared."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
