"""Head-pruned BERT models: removed attention heads sliced out in memory, stored dense on disk.

transformers 5 removed ``prune_heads``, ``config.pruned_heads`` and ``head_mask``, and a BERT config
cannot describe fewer heads of the same size (``attention_head_size = hidden_size / num_attention_heads``
and ``all_head_size`` is always ``hidden_size``), so a sliced attention cannot be loaded by plain
transformers. Instead, pruned attention modules get a ``state_dict`` hook that writes the removed heads
back as zeros, so ``save_pretrained`` writes a dense BERT that plain ``from_pretrained`` loads and that
computes the same logits (a zero head adds exactly zero: zero value rows, zero output columns). The
removed heads are listed in ``config.tuneforge_pruned_heads``; :func:`restore_pruning` slices them away
again after loading, for the speed. A matching ``load_state_dict`` pre-hook slices dense state dicts, so
checkpoints round-trip too. Loaders call :func:`restore_pruning`; ``tuneforge.optimize.prune`` prunes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

PRUNED_HEADS_KEY = "tuneforge_pruned_heads"


# --- model layout ---------------------------------------------------------------------------------


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's layer list of a BERT-family model (``base_model.encoder.layer``)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"{type(model).__name__}: structured pruning needs a BERT-family encoder (base_model.encoder.layer)"
        )
    return layers


def bert_parts(layer: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """(attention, query, key, value, attention-output dense, intermediate dense, output dense) of a layer."""
    try:
        attention = layer.attention
        parts = (
            attention,
            attention.self.query,
            attention.self.key,
            attention.self.value,
            attention.output.dense,
            layer.intermediate.dense,
            layer.output.dense,
        )
    except AttributeError:
        parts = ()
    if len(parts) != 7 or not all(isinstance(p, nn.Linear) for p in parts[1:]):
        raise ConfigError(
            f"{type(layer).__name__}: structured pruning supports the BERT layer layout "
            "(attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense)"
        )
    return parts  # type: ignore[return-value]


def num_heads(model: nn.Module) -> int:
    return int(model.config.num_attention_heads)


def head_size(model: nn.Module) -> int:
    return int(model.config.hidden_size) // num_heads(model)


def kept_heads(model: nn.Module) -> list[list[int]]:
    """Per layer, the original indices of the heads still in the model."""
    n = num_heads(model)
    return [list(getattr(layer.attention, "_tuneforge_kept_heads", range(n))) for layer in encoder_layers(model)]


def ffn_sizes(model: nn.Module) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in encoder_layers(model)]


def count_parameters(model: nn.Module) -> int:
    """Parameters in memory (shared tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --- head slicing and its dense (loadable) form ---------------------------------------------------


def _head_rows(heads: Sequence[int], head_size: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads])


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` of the weight (0: output rows, also the bias; 1: input columns)."""
    with torch.no_grad():
        linear.weight = nn.Parameter(
            linear.weight.index_select(dim, index).clone(), requires_grad=linear.weight.requires_grad
        )
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[index].clone(), requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = int(index.numel())
    else:
        linear.in_features = int(index.numel())


_QKV = ("self.query", "self.key", "self.value")


def _pad_heads_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook of a head-pruned attention: write the removed heads back as zeros."""
    if getattr(module, "_tuneforge_sliced_state_dict", False):
        return
    kept = module._tuneforge_kept_heads
    n, d = module._tuneforge_num_heads, module._tuneforge_head_size
    if len(kept) == n:
        return
    rows = _head_rows(kept, d)
    for name in _QKV:
        for kind in ("weight", "bias"):
            key = f"{prefix}{name}.{kind}"
            if key in state_dict and state_dict[key].shape[0] == len(kept) * d:
                value = state_dict[key].detach()
                dense = value.new_zeros((n * d, *value.shape[1:]))
                dense[rows] = value
                state_dict[key] = dense
    key = f"{prefix}output.dense.weight"
    if key in state_dict and state_dict[key].shape[1] == len(kept) * d:
        value = state_dict[key].detach()
        dense = value.new_zeros((value.shape[0], n * d))
        dense[:, rows] = value
        state_dict[key] = dense


def _slice_heads_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook of a head-pruned attention: accept dense (saved) tensors by slicing them."""
    kept = module._tuneforge_kept_heads
    n, d = module._tuneforge_num_heads, module._tuneforge_head_size
    if len(kept) == n:
        return
    rows = _head_rows(kept, d)
    for name in _QKV:
        for kind in ("weight", "bias"):
            key = f"{prefix}{name}.{kind}"
            if key in state_dict and state_dict[key].shape[0] == n * d:
                state_dict[key] = state_dict[key][rows]
    key = f"{prefix}output.dense.weight"
    if key in state_dict and state_dict[key].shape[1] == n * d:
        state_dict[key] = state_dict[key][:, rows]


def remove_heads(model: nn.Module, layer_index: int, remove: Sequence[int]) -> None:
    """Slice the heads with original indices ``remove`` out of layer ``layer_index``."""
    if not remove:
        return
    layer = encoder_layers(model)[layer_index]
    attention, query, key, value, out, _, _ = bert_parts(layer)
    n, d = num_heads(model), head_size(model)
    kept = list(getattr(attention, "_tuneforge_kept_heads", range(n)))
    removed = set(remove)
    keep_positions = [pos for pos, head in enumerate(kept) if head not in removed]
    if not keep_positions:
        raise ValueError(f"layer {layer_index}: cannot remove every attention head")
    rows = _head_rows(keep_positions, d)
    for linear in (query, key, value):
        slice_linear(linear, rows, 0)
    slice_linear(out, rows, 1)
    self_attention = attention.self
    if hasattr(self_attention, "num_attention_heads"):
        self_attention.num_attention_heads = len(keep_positions)
    if hasattr(self_attention, "all_head_size"):
        self_attention.all_head_size = len(keep_positions) * d
    first_time = not hasattr(attention, "_tuneforge_kept_heads")
    attention._tuneforge_kept_heads = [kept[pos] for pos in keep_positions]
    attention._tuneforge_num_heads = n
    attention._tuneforge_head_size = d
    if first_time:
        attention.register_state_dict_post_hook(_pad_heads_state_dict)
        attention.register_load_state_dict_pre_hook(_slice_heads_state_dict)


def record_pruned_heads(model: nn.Module) -> None:
    n = num_heads(model)
    removed = {str(i): sorted(set(range(n)) - set(kept)) for i, kept in enumerate(kept_heads(model)) if len(kept) < n}
    if removed:
        setattr(model.config, PRUNED_HEADS_KEY, removed)
    elif hasattr(model.config, PRUNED_HEADS_KEY):
        delattr(model.config, PRUNED_HEADS_KEY)


@contextmanager
def sliced_state_dict(model: nn.Module) -> Iterator[None]:
    """Within this block ``state_dict()`` shows the real, sliced parameters (no dense zero padding).

    Tracers (ONNX export) read ``state_dict(keep_vars=True)`` to find a module's parameters; the dense
    copies made for saving are not those parameters, and tracing would fail.
    """
    attentions = [m for m in model.modules() if hasattr(m, "_tuneforge_kept_heads")]
    for module in attentions:
        module._tuneforge_sliced_state_dict = True
    try:
        yield
    finally:
        for module in attentions:
            module._tuneforge_sliced_state_dict = False


def restore_pruning(model: nn.Module) -> nn.Module:
    """Slice away the heads listed in ``config.tuneforge_pruned_heads`` (after a plain ``from_pretrained``).

    A head-pruned model is saved dense, with its removed heads as zeros, so that plain transformers
    loads it; this puts it back in its small, fast form. The logits stay the same. A model without
    pruned heads is returned unchanged.
    """
    recorded = getattr(model.config, PRUNED_HEADS_KEY, None) or {}
    n = num_heads(model)
    for key, heads in recorded.items():
        index = int(key)
        current = set(range(n)) - set(kept_heads(model)[index])
        remove_heads(model, index, sorted(set(heads) - current))
    return model
