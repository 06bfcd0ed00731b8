"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), written here because peft has none.

An adapter is a small residual MLP, ``h + up(gelu(down(h)))`` with ``down`` to ``bottleneck`` units,
inserted on a sub-layer's output projection, before that sub-layer's dropout, residual connection and
LayerNorm (Houlsby's placement). ``up`` starts near zero, so the adapted model starts as the pretrained
one and training moves away from it gradually.

- pfeiffer: one adapter per layer, after the feed-forward output (half the parameters, about as accurate);
- houlsby: also one after the attention output.

The adapter wraps the Linear it follows (``base_layer``, peft's name), so only our own layers change; the
saved file holds the adapters and the head, named as in the model (``...output.dense.adapter.down.weight``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from tuneforge.adapters.common import head_module_names
from tuneforge.config import AdapterOptions
from tuneforge.errors import ConfigError, ModelError

KEY = "finetune.adapter"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
# Output projections of each encoder layer's sub-layers, by architecture family: BERT/RoBERTa/ELECTRA/
# DeBERTa name them <layer>.output.dense and <layer>.attention.output.dense; DistilBERT ffn.lin2 and attention.out_lin.
FEED_FORWARD_OUTPUT = re.compile(r"\.layer\.\d+\.(output\.dense|ffn\.lin2)$")
ATTENTION_OUTPUT = re.compile(r"\.layer\.\d+\.attention\.(output\.dense|out_lin)$")
# "Near zero": small enough that the adapter starts as (almost) the identity, not exactly zero, so that the
# down-projection gets a gradient from the very first step.
UP_INIT_STD = 1e-3


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, bottleneck: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.up.weight, std=UP_INIT_STD)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.dropout(F.gelu(self.down(hidden))))


class AdaptedLinear(nn.Module):
    """A frozen Linear followed by its adapter."""

    def __init__(self, base_layer: nn.Linear, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(inputs))


def adapter_sites(model: nn.Module, style: str) -> list[str]:
    """Names of the Linear layers an adapter follows, in model order."""
    patterns = [FEED_FORWARD_OUTPUT] if style == "pfeiffer" else [FEED_FORWARD_OUTPUT, ATTENTION_OUTPUT]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(p.search(name) for p in patterns)
    ]


def check(model: PreTrainedModel, options: AdapterOptions) -> None:
    sites = adapter_sites(model, options.style)
    if not any(FEED_FORWARD_OUTPUT.search(name) for name in sites):
        raise ConfigError(
            f"finetune.method: adapter cannot find the feed-forward output layers of {type(model).__name__} "
            "(it knows BERT-style <layer>.output.dense and DistilBERT-style ffn.lin2); use lora or ia3"
        )
    if options.style == "houlsby" and not any(ATTENTION_OUTPUT.search(name) for name in sites):
        raise ConfigError(
            f"{KEY}.style: houlsby needs attention output layers, and {type(model).__name__} has none it knows "
            "(<layer>.attention.output.dense or attention.out_lin); use pfeiffer"
        )


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(module, AdaptedLinear) for module in model.modules())


def wrap(model: PreTrainedModel, options: AdapterOptions, *, total_steps: int = 0) -> PreTrainedModel:
    """Insert adapters in place and freeze everything but them and the head; returns ``model``."""
    check(model, options)
    heads = head_module_names(model)
    model.requires_grad_(False)
    for name in adapter_sites(model, options.style):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        adapter = BottleneckAdapter(linear.out_features, options.bottleneck, options.dropout)
        adapter.to(device=linear.weight.device, dtype=linear.weight.dtype)
        setattr(parent, child, AdaptedLinear(linear, adapter))
    for module in model.modules():
        if isinstance(module, BottleneckAdapter):
            module.requires_grad_(True)
    for head in heads:
        getattr(model, head).requires_grad_(True)
    return model


def _saved_keys(model: PreTrainedModel) -> list[str]:
    heads = tuple(f"{head}." for head in head_module_names(model))
    return [key for key in model.state_dict() if ".adapter." in key or key.startswith(heads)]


def save(model: PreTrainedModel, folder: Path) -> None:
    state = model.state_dict()
    save_file({key: state[key].detach().contiguous() for key in _saved_keys(model)}, str(folder / WEIGHTS_FILE))


def load(model: PreTrainedModel, folder: Path, options: AdapterOptions) -> PreTrainedModel:
    """Rebuild the adapters on ``model`` from ``folder`` (safetensors only) for inference."""
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise ModelError(f"{folder}: no {WEIGHTS_FILE}; not a saved bottleneck adapter")
    wrap(model, options)
    weights = load_file(str(weights_file))
    expected = set(_saved_keys(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ModelError(f"{weights_file}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatch, e.g. a different base model
        raise ModelError(f"{weights_file}: does not fit the model: {str(exc).splitlines()[0]}") from None
    model.requires_grad_(False)
    model.eval()
    return model
