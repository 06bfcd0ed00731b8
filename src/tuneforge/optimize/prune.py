"""Structured pruning of BERT-family sequence classifiers: whole attention heads and FFN neurons.

Importance (which parts to remove) is first-order and gradient based:

- Heads, after Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"): the importance of head
  ``h`` is ``|∂L/∂ξ_h|`` for a mask ``ξ`` (all ones) that multiplies the head's output, accumulated
  over the batches of a calibration set, then L2-normalised within each layer. transformers 5 dropped
  the ``head_mask`` argument, so the mask is applied with a forward hook on each self-attention
  module, scaling the context vectors of each head; since a head's context is ``softmax(QKᵀ)V``,
  scaling it is the same as scaling that head's attention probabilities, which is what ``head_mask``
  did, so the gradient is the same quantity.
- FFN neurons: the same mask-gradient on each intermediate activation (after the activation function),
  which equals ``|Σ_tokens a · ∂L/∂a|`` per batch, the first-order Taylor estimate of the loss change
  when the neuron is removed (Molchanov et al. 2017, "Pruning Convolutional Neural Networks for
  Resource Efficient Inference"). Both scores come out of one forward/backward pass per batch.

Pruning physically slices the weights, so the model has fewer parameters and does less work:

- FFN: the same number of neurons is kept in every layer (rows of ``intermediate.dense``, columns of
  ``output.dense``), ``config.intermediate_size`` is updated, and the result is a plain BERT that
  ``save_pretrained`` / ``from_pretrained`` handle with no help, smaller on disk too.
- Heads: rows of ``query``/``key``/``value`` and columns of ``attention.output.dense``; each layer keeps
  at least one head, and layers may keep different numbers. transformers 5 removed ``prune_heads``,
  ``config.pruned_heads`` and ``head_mask``, and a BERT config cannot describe fewer heads of the same
  size (``attention_head_size = hidden_size / num_attention_heads`` and ``all_head_size`` is always
  ``hidden_size``), so a sliced attention cannot be loaded by plain transformers. Instead, the
  pruned attention modules get a ``state_dict`` hook that writes the removed heads back as zeros, so
  ``save_pretrained`` writes a dense BERT that plain ``AutoModelForSequenceClassification.from_pretrained``
  loads and that computes the same logits (a zero head adds exactly zero: zero value rows, zero output
  columns); the removed heads are listed in ``config.tuneforge_pruned_heads`` and
  :func:`restore_pruning` slices them away again after loading, for the speed. A matching
  ``load_state_dict`` pre-hook slices dense state dicts, so checkpoints round-trip too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.data.batching import collate
from tuneforge.models.pruned import (
    bert_parts,
    encoder_layers,
    ffn_sizes,
    kept_heads,
    num_heads,
    record_pruned_heads,
    remove_heads,
    restore_pruning,
    slice_linear,
)

# --- importance -----------------------------------------------------------------------------------


def _head_mask_hook(mask: torch.Tensor):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        context = output[0] if isinstance(output, tuple) else output
        shape = context.shape
        scaled = (context.view(*shape[:-1], mask.numel(), -1) * mask[:, None]).view(shape)
        return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

    return hook


def _neuron_mask_hook(mask: torch.Tensor):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * mask

    return hook


def importance(
    model: nn.Module, encoded: Sequence[Sequence[int]], labels: Sequence[int], *, pad_id: int, batch_size: int = 32
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Head scores ``[layers, heads]`` and FFN neuron scores (one tensor per layer) in one calibration pass.

    Cross-entropy of ``model`` in eval mode (no dropout) on the calibration examples, batched by length;
    for each batch, the absolute gradient of the loss w.r.t. all-ones masks on each head's output and on
    each intermediate neuron is added up. Each layer's scores are then divided by their L2 norm (Michel
    et al.), so layers compare on the same scale. Heads already removed score 0 (their column keeps
    the original head numbering). Parameter ``.grad`` is left untouched.
    """
    if len(encoded) != len(labels):
        raise ValueError(f"{len(encoded)} examples but {len(labels)} labels")
    if not encoded:
        raise ValueError("importance needs at least one calibration example")
    layers = encoder_layers(model)
    kept = kept_heads(model)
    # Masks in the model's dtype, so a half-precision model stays in half precision.
    dtype = next(model.parameters()).dtype
    head_masks = [torch.ones(len(k), dtype=dtype, requires_grad=True) for k in kept]
    ffn_masks = [torch.ones(size, dtype=dtype, requires_grad=True) for size in ffn_sizes(model)]
    head_acc = [torch.zeros(len(k)) for k in kept]
    ffn_acc = [torch.zeros(size) for size in ffn_sizes(model)]
    handles = []
    for layer, head_mask, ffn_mask in zip(layers, head_masks, ffn_masks, strict=True):
        bert_parts(layer)
        handles.append(layer.attention.self.register_forward_hook(_head_mask_hook(head_mask)))
        handles.append(layer.intermediate.register_forward_hook(_neuron_mask_hook(ffn_mask)))
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    masks = head_masks + ffn_masks
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = collate([list(encoded[i]) for i in indices], pad_id)
            target = torch.tensor([labels[i] for i in indices], dtype=torch.long)
            loss = F.cross_entropy(model(**batch).logits.float(), target)
            grads = torch.autograd.grad(loss, masks)
            for acc, grad in zip(head_acc + ffn_acc, grads, strict=True):
                acc += grad.detach().abs().float()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    n = num_heads(model)
    heads = torch.zeros(len(layers), n)
    for i, (k, acc) in enumerate(zip(kept, head_acc, strict=True)):
        heads[i, k] = _normalised(acc)
    return heads, [_normalised(acc) for acc in ffn_acc]


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(scores)
    return scores / norm if norm > 0 else scores


def head_importance(
    model: nn.Module, encoded: Sequence[Sequence[int]], labels: Sequence[int], *, pad_id: int, batch_size: int = 32
) -> torch.Tensor:
    """Michel et al. 2019 head importance, ``[layers, heads]``, each layer L2-normalised; see :func:`importance`."""
    return importance(model, encoded, labels, pad_id=pad_id, batch_size=batch_size)[0]


def ffn_importance(
    model: nn.Module, encoded: Sequence[Sequence[int]], labels: Sequence[int], *, pad_id: int, batch_size: int = 32
) -> list[torch.Tensor]:
    """First-order Taylor importance of every intermediate neuron, one tensor per layer; see :func:`importance`."""
    return importance(model, encoded, labels, pad_id=pad_id, batch_size=batch_size)[1]


# --- pruning --------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


def heads_to_remove(head_scores: torch.Tensor, kept: Sequence[Sequence[int]], fraction: float) -> dict[int, list[int]]:
    """The ``round(fraction * remaining)`` lowest-scoring remaining heads, ranked across all layers, but
    never a layer's last head. Returns layer -> original head indices."""
    remaining = [(float(head_scores[layer, head]), layer, head) for layer, heads in enumerate(kept) for head in heads]
    budget = min(round(fraction * len(remaining)), len(remaining) - len(kept))
    left = [len(heads) for heads in kept]
    chosen: dict[int, list[int]] = {}
    # Ties (e.g. all zeros) go to the later layer and head, deterministically.
    for _, layer, head in sorted(remaining, key=lambda item: (item[0], -item[1], -item[2])):
        if budget <= 0:
            break
        if left[layer] <= 1:
            continue
        chosen.setdefault(layer, []).append(head)
        left[layer] -= 1
        budget -= 1
    return chosen


def prune(
    model: nn.Module,
    *,
    head_fraction: float,
    ffn_fraction: float,
    head_scores: torch.Tensor | None,
    ffn_scores: Sequence[torch.Tensor] | None,
) -> nn.Module:
    """Remove the least important heads and FFN neurons in place; returns ``model``.

    - Heads: ``round(head_fraction * H)`` of the ``H`` remaining heads with the lowest ``head_scores``
      (``[layers, heads]``, original head numbering, e.g. from :func:`head_importance`), ranked across
      layers; every layer keeps at least one head, so ``head_fraction=1`` leaves one per layer.
    - FFN: in every layer the ``round(ffn_fraction * I)`` neurons with the lowest score (of ``I``), at
      most ``I - 1``, so all layers keep the same number and ``config.intermediate_size`` stays true.

    Scores may be None only when the matching fraction is 0. The model then saves with
    ``save_pretrained`` to a folder plain ``AutoModelForSequenceClassification.from_pretrained`` loads
    with the same logits (see the module docstring for how removed heads are stored).
    """
    _check_fraction("head_fraction", head_fraction)
    _check_fraction("ffn_fraction", ffn_fraction)
    layers = encoder_layers(model)
    for layer in layers:
        bert_parts(layer)
    # A pruned model loaded with plain from_pretrained still holds its removed heads as zeros.
    restore_pruning(model)

    if head_fraction > 0:
        if head_scores is None:
            raise ValueError("head_fraction > 0 needs head_scores")
        kept = kept_heads(model)
        if tuple(head_scores.shape) != (len(layers), num_heads(model)):
            raise ValueError(
                f"head_scores has shape {tuple(head_scores.shape)}, expected {(len(layers), num_heads(model))}"
            )
        for layer_index, heads in heads_to_remove(head_scores, kept, head_fraction).items():
            remove_heads(model, layer_index, heads)
        record_pruned_heads(model)

    if ffn_fraction > 0:
        if ffn_scores is None:
            raise ValueError("ffn_fraction > 0 needs ffn_scores")
        sizes = ffn_sizes(model)
        if len(set(sizes)) != 1:
            raise ValueError(f"FFN sizes differ between layers: {sizes}")
        size = sizes[0]
        if len(ffn_scores) != len(layers) or any(s.numel() != size for s in ffn_scores):
            raise ValueError(f"ffn_scores must hold {len(layers)} tensors of {size} scores")
        keep = size - min(round(ffn_fraction * size), size - 1)
        if keep < size:
            for layer, scores in zip(layers, ffn_scores, strict=True):
                # Highest scores kept, in their original order; ties broken by index (stable sort).
                index = torch.sort(torch.argsort(scores.detach().float(), descending=True, stable=True)[:keep]).values
                slice_linear(layer.intermediate.dense, index, 0)
                slice_linear(layer.output.dense, index, 1)
            model.config.intermediate_size = keep
    return model
