"""Seeded, stratified splitting and subsampling."""

from __future__ import annotations

import math
from collections import Counter

from tuneforge.data.readers import LabelledTexts
from tuneforge.errors import DataError


def _split_indices(labels: list[str], n_held: int, seed: int) -> tuple[list[int], list[int]]:
    """Return (kept, held) index lists with ``len(held) == n_held``, stratified where possible."""
    from sklearn.model_selection import train_test_split  # slow import; only splitting needs it

    n = len(labels)
    counts = Counter(labels)
    singles = [i for i, label in enumerate(labels) if counts[label] == 1]
    # A class with a single example cannot be in both parts; sklearn's stratify refuses it outright.
    # Keep such rows on the kept side and stratify the rest, so every class with >= 2 examples lands
    # on both sides.
    rest = [i for i, label in enumerate(labels) if counts[label] > 1]
    if rest and 0 < n_held < len(rest):
        try:
            kept, held = train_test_split(
                rest,
                test_size=n_held,
                random_state=seed,
                shuffle=True,
                stratify=[labels[i] for i in rest],
            )
        except ValueError:
            pass  # fewer held slots than classes (or the reverse): no stratified split exists
        else:
            return sorted([*kept, *singles]), sorted(held)
    kept, held = train_test_split(list(range(n)), test_size=n_held, random_state=seed, shuffle=True)
    return sorted(kept), sorted(held)


def stratified_split(data: LabelledTexts, *, fraction: float, seed: int) -> tuple[LabelledTexts, LabelledTexts]:
    """Split off ``fraction`` of the rows (at least one) as a held-out part: returns (rest, held_out).

    Both parts keep the source order of rows. Classes with a single example stay in ``rest``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    n = len(data)
    if n < 2:
        raise DataError(f"{data.source}: only {n} row(s); cannot split off a validation set")
    n_held = min(max(1, math.ceil(fraction * n)), n - 1)
    kept, held = _split_indices(data.labels, n_held, seed)
    return data.subset(kept), data.subset(held)


def stratified_subsample(data: LabelledTexts, *, n: int, seed: int) -> LabelledTexts:
    """A seeded subsample of ``n`` rows with class proportions kept; all rows if ``n >= len(data)``."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if n >= len(data):
        return data
    _, held = _split_indices(data.labels, n, seed)
    return data.subset(held)
