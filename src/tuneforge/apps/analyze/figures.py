"""What a run gets wrong on a labelled file: the label pairs it mixes up, its most confident mistakes,
and how honest its confidence is per class.

Per-class calibration is measured two ways. ``classwise_ece`` (Kull et al. 2019): over all texts, bins of
p(class), mean p(class) against how often the class is the given label; it sees a model that gives a class
too much or too little probability anywhere. ``overconfidence``: when the model answers the class, its mean
confidence minus its precision there (positive: it claims more than it delivers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ECE_BINS = 15


@dataclass(frozen=True)
class ConfusedPair:
    """Two labels the model mixes up: ``a_as_b`` texts of ``a`` answered ``b``, ``b_as_a`` the reverse."""

    a: str
    b: str
    a_as_b: int
    b_as_a: int

    @property
    def total(self) -> int:
        return self.a_as_b + self.b_as_a


@dataclass(frozen=True)
class Mistake:
    """A text answered wrongly, with the model's confidence in its wrong answer (and, where the explanation
    module is installed, the words that pushed it there: ``explanation`` as [(word, score), ...])."""

    index: int
    row: int
    text: str
    given_label: str
    predicted_label: str
    confidence: float
    given_probability: float
    explanation: list[tuple[str, float]] = field(default_factory=list)


def _bins(values: np.ndarray) -> np.ndarray:
    # Bin i holds values in (i/B, (i+1)/B]; exactly 0 goes to bin 0.
    return np.clip(np.ceil(values * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)


def confused_pairs(
    given: Sequence[int], predicted: Sequence[int], names: Sequence[str], *, top: int = 20
) -> list[ConfusedPair]:
    """The label pairs most often mixed up (both directions counted together), most first."""
    k = len(names)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(given, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    pairs = [
        ConfusedPair(names[a], names[b], int(matrix[a, b]), int(matrix[b, a]))
        for a in range(k)
        for b in range(a + 1, k)
        if matrix[a, b] or matrix[b, a]
    ]
    pairs.sort(key=lambda pair: (-pair.total, pair.a, pair.b))
    return pairs[:top]


def confident_mistakes(
    probabilities: np.ndarray,
    given: Sequence[int],
    names: Sequence[str],
    texts: Sequence[str],
    rows: Sequence[int],
    *,
    top: int = 20,
) -> list[Mistake]:
    """The wrong answers the model was surest of, surest first."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(given, dtype=np.int64)
    predicted = p.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y)
    ranked = wrong[np.argsort(-p[wrong, predicted[wrong]], kind="stable")][:top]
    return [
        Mistake(
            index=int(i),
            row=int(rows[i]),
            text=texts[i],
            given_label=names[y[i]],
            predicted_label=names[predicted[i]],
            confidence=float(p[i, predicted[i]]),
            given_probability=float(p[i, y[i]]),
        )
        for i in ranked
    ]


def per_class(probabilities: np.ndarray, given: Sequence[int], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per label present in the data or answered: support, recall, precision, mean confidence when answered,
    overconfidence (that minus precision) and classwise ECE; worst-calibrated first."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(given, dtype=np.int64)
    predicted = p.argmax(axis=1)
    confidence = p.max(axis=1)
    out = []
    for k, name in enumerate(names):
        is_given, answered = y == k, predicted == k
        if not is_given.any() and not answered.any():
            continue
        # Classwise ECE: all texts, binned by p(k), mean p(k) against the share whose label is k.
        column = p[:, k]
        bins = _bins(column)
        ece = sum(
            (bins == b).mean() * abs(column[bins == b].mean() - is_given[bins == b].mean()) for b in np.unique(bins)
        )
        precision = float((y[answered] == k).mean()) if answered.any() else None
        mean_confidence = float(confidence[answered].mean()) if answered.any() else None
        out.append(
            {
                "label": name,
                "support": int(is_given.sum()),
                "answered": int(answered.sum()),
                "recall": float((predicted[is_given] == k).mean()) if is_given.any() else None,
                "precision": precision,
                "confidence": mean_confidence,
                "overconfidence": mean_confidence - precision if precision is not None else None,
                "classwise_ece": float(ece),
            }
        )
    out.sort(key=lambda row: (-row["classwise_ece"], row["label"]))
    return out


def summary(probabilities: np.ndarray, given: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (percent, over the labels present), top-1 ECE (as ``tuneforge evaluate`` reports it)
    and mean confidence."""
    from sklearn.metrics import f1_score

    from tuneforge.infer.calibration import calibration_metrics

    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(given, dtype=np.int64)
    predicted = p.argmax(axis=1)
    correct = predicted == y
    return {
        "n": len(y),
        "labels": len(np.unique(y)),
        "accuracy": round(100.0 * float(correct.mean()), 2),
        "macro_f1": round(
            100.0 * float(f1_score(y, predicted, labels=np.unique(y), average="macro", zero_division=0)), 2
        ),
        "ece": round(calibration_metrics(p, y)["ece"], 4),
        "mean_confidence": round(float(p.max(axis=1).mean()), 4),
    }
