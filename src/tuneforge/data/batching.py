"""Tokenising for training and the length-grouped batch order that keeps padding small."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch

_ENCODE_CHUNK = 1000


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text (special tokens included, truncated to ``max_length``, not padded)."""
    ids: list[list[int]] = []
    # Chunks bound the memory of the tokenizer's intermediate encodings on large corpora.
    for start in range(0, len(texts), _ENCODE_CHUNK):
        batch = list(texts[start : start + _ENCODE_CHUNK])
        encoded = tokenizer(batch, truncation=True, max_length=max_length, padding=False)
        ids.extend(list(seq) for seq in encoded["input_ids"])
    return ids


def _chunk(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def length_grouped_batches(
    lengths: list[int],
    batch_size: int,
    *,
    generator: torch.Generator | None,
    shuffle: bool = True,
    group_by_length: bool = True,
    mega_batch_factor: int = 50,
) -> list[list[int]]:
    """The example indices of one epoch, cut into batches.

    Shuffled and grouped: a seeded permutation is cut into mega-batches of ``mega_batch_factor *
    batch_size`` examples, each sorted by length (descending) and cut into batches, and the batch
    order is shuffled again. Batches then hold texts of similar length (little padding) while the
    order stays random and is fully determined by ``generator``.
    Not shuffled: longest first when grouping (inference), else the original order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mega_batch_factor < 1:
        raise ValueError(f"mega_batch_factor must be >= 1, got {mega_batch_factor}")
    n = len(lengths)
    if n == 0:
        return []
    if not shuffle:
        order = list(range(n))
        if group_by_length:
            order.sort(key=lambda i: lengths[i], reverse=True)  # stable: ties keep source order
        return _chunk(order, batch_size)

    permutation = torch.randperm(n, generator=generator).tolist()
    if not group_by_length:
        return _chunk(permutation, batch_size)
    mega = mega_batch_factor * batch_size
    ordered: list[int] = []
    for start in range(0, n, mega):
        block = permutation[start : start + mega]
        block.sort(key=lambda i: lengths[i], reverse=True)
        ordered.extend(block)
    # mega is a multiple of batch_size, so no batch straddles two mega-batches.
    batches = _chunk(ordered, batch_size)
    batch_order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in batch_order]


def collate(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence: ``input_ids`` and ``attention_mask`` (int64)."""
    if not ids:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([len(seq) for seq in ids], dtype=torch.long)
    width = int(lengths.max())
    attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    # One flat tensor and one masked assignment instead of a tensor per row.
    input_ids[attention_mask.bool()] = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
