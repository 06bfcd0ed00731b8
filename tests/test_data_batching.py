"""Length-grouped batch order, collation and encoding."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tuneforge.data import collate, encode_texts, length_grouped_batches


def seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch) for batch in batches)


def skewed_lengths(n: int = 2000) -> list[int]:
    rng = random.Random(0)
    # Mostly short texts with a long tail, as in real review data.
    return [min(512, int(rng.paretovariate(1.5) * 8)) for _ in range(n)]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_exactly_once(group: bool, shuffle: bool) -> None:
    lengths = skewed_lengths(1003)
    batches = length_grouped_batches(
        lengths, 16, generator=seeded(0), shuffle=shuffle, group_by_length=group, mega_batch_factor=4
    )
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1003))
    assert all(1 <= len(batch) <= 16 for batch in batches)
    assert sum(len(batch) < 16 for batch in batches) == 1


def test_deterministic_for_a_seed() -> None:
    lengths = skewed_lengths(500)
    first = length_grouped_batches(lengths, 8, generator=seeded(42))
    assert first == length_grouped_batches(lengths, 8, generator=seeded(42))
    assert first != length_grouped_batches(lengths, 8, generator=seeded(43))
    generator = seeded(42)
    epoch_one = length_grouped_batches(lengths, 8, generator=generator)
    epoch_two = length_grouped_batches(lengths, 8, generator=generator)
    assert epoch_one != epoch_two  # one generator across epochs gives each epoch a new order


def test_grouping_reduces_padding() -> None:
    lengths = skewed_lengths()
    grouped = length_grouped_batches(lengths, 32, generator=seeded(1), group_by_length=True)
    plain = length_grouped_batches(lengths, 32, generator=seeded(1), group_by_length=False)
    assert padded_tokens(grouped, lengths) < 0.5 * padded_tokens(plain, lengths)


def test_inference_order() -> None:
    lengths = [3, 9, 1, 9, 5]
    assert length_grouped_batches(lengths, 2, generator=None, shuffle=False) == [[1, 3], [4, 0], [2]]
    assert length_grouped_batches(lengths, 2, generator=None, shuffle=False, group_by_length=False) == [
        [0, 1],
        [2, 3],
        [4],
    ]
    assert length_grouped_batches([], 4, generator=None) == []


def test_collate() -> None:
    batch = collate([[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]], pad_id=0)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"].tolist() == [[101, 7, 102, 0, 0], [101, 102, 0, 0, 0], [101, 5, 6, 7, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert collate([[4, 4]], pad_id=9)["input_ids"].tolist() == [[4, 4]]


class TruncatingTokenizer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: list[str], *, truncation: bool, max_length: int, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        ids = [[1, *(len(word) for word in text.split()), 2] for text in texts]
        return {"input_ids": [[*seq[: max_length - 1], 2] if len(seq) > max_length else seq for seq in ids]}


def test_encode_texts_chunks_and_truncates() -> None:
    tokenizer = TruncatingTokenizer()
    texts = ["aa bbb"] * 1500 + ["a b c d e f g h"]
    ids = encode_texts(tokenizer, texts, max_length=5)
    assert tokenizer.calls == 2  # chunks of 1000
    assert ids[0] == [1, 2, 3, 2]
    assert ids[-1] == [1, 1, 1, 1, 2]
    assert len(ids) == 1501
