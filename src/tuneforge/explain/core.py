"""``explain(predictor, text)``: one text's word-level attributions, by occlusion or integrated gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tuneforge.errors import DataError
from tuneforge.explain.occlusion import occlusion_scores, occlusion_texts
from tuneforge.explain.words import Word, split_words

METHODS = ("occlusion", "integrated_gradients")
# Occlusion runs the model on n + 1 texts for n words: the limit keeps one explanation one bounded batch.
# 128 words is far beyond a support message (Banking77's longest has 79).
MAX_WORDS = 128


class ProbabilityModel(Protocol):
    """What occlusion needs: a Predictor, or the model a server runs."""

    labels: list[str]

    def predict_proba(self, texts: list[str]) -> Sequence[Sequence[float]] | np.ndarray: ...


@dataclass(frozen=True)
class Explanation:
    """Each word's score for ``label``: positive words pushed the model towards it, negative ones away.

    Occlusion: p(label | text) - p(label | text without the word). Integrated gradients: the word's share of
    p(label | text) - p(label | baseline) (``baseline_probability``), off by at most ``delta`` in total.
    """

    text: str
    words: list[Word]
    scores: list[float]
    label: str
    probability: float
    method: str
    delta: float | None = None
    baseline_probability: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "probability": round(self.probability, 6),
            "method": self.method,
            "words": [
                {"word": word.text, "start": word.start, "end": word.end, "score": round(score, 6)}
                for word, score in zip(self.words, self.scores, strict=True)
            ],
        }
        if self.delta is not None:
            out["delta"] = round(self.delta, 6)
            out["baseline_probability"] = round(float(self.baseline_probability or 0.0), 6)
        return out


def words_to_explain(text: str, *, max_words: int = MAX_WORDS) -> list[Word]:
    """The words of ``text``, or a clear error for a text with none or with more than ``max_words``."""
    if not isinstance(text, str):
        raise DataError(f"explain: the text must be a string, not {type(text).__name__}")
    words = split_words(text)
    if not words:
        raise DataError("explain: the text is empty (only whitespace); give a text to explain")
    if len(words) > max_words:
        raise DataError(
            f"explain: the text has {len(words)} words; the limit is {max_words} (occlusion runs the model "
            "once per word): explain a shorter part of it"
        )
    return words


def label_index(labels: Sequence[str], label: str | None) -> int | None:
    """The label's output index (None: the model's best label), or an error naming the labels there are."""
    if label is None:
        return None
    try:
        return list(labels).index(label)
    except ValueError:
        shown = ", ".join(repr(name) for name in list(labels)[:10])
        more = f" and {len(labels) - 10} more" if len(labels) > 10 else ""
        raise DataError(f"explain: unknown label {label!r}; the model's labels are {shown}{more}") from None


def explain_occlusion(
    model: ProbabilityModel, text: str, words: list[Word], index: int | None, probabilities: np.ndarray
) -> Explanation:
    """The explanation from the model's probabilities for :func:`occlusion_texts` (however they were batched)."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape[0] != len(words) + 1:
        raise ValueError(f"{probabilities.shape[0]} rows of probabilities for {len(words)} words (expected n + 1)")
    chosen = int(np.argmax(probabilities[0])) if index is None else index
    probability, scores = occlusion_scores(probabilities, chosen)
    return Explanation(text, words, scores, model.labels[chosen], probability, "occlusion")


def explain(
    predictor: Any,
    text: str,
    *,
    method: str = "occlusion",
    label: str | None = None,
    steps: int | None = None,
    max_words: int = MAX_WORDS,
) -> Explanation:
    """Which words of ``text`` made ``predictor`` answer ``label`` (default: its best trained label).

    ``occlusion`` works with any model that has ``labels`` and ``predict_proba`` (a Predictor on any form);
    all n + 1 texts go in one ``predict_proba`` call, batched as the model batches.
    ``integrated_gradients`` needs a Predictor on a float PyTorch form; ``steps``: points on its path.
    An open-set detector plays no part: the labels explained are the trained ones.
    """
    if method not in METHODS:
        raise DataError(f"explain: unknown method {method!r}; one of {', '.join(METHODS)}")
    words = words_to_explain(text, max_words=max_words)
    index = label_index(predictor.labels, label)
    if method == "occlusion":
        probabilities = np.asarray(predictor.predict_proba(occlusion_texts(text, words)), dtype=np.float64)
        return explain_occlusion(predictor, text, words, index, probabilities)
    from tuneforge.explain.integrated import DEFAULT_STEPS, integrated_gradients

    found = integrated_gradients(predictor, text, words, label_index=index, steps=steps or DEFAULT_STEPS)
    return Explanation(
        text,
        words,
        found.scores,
        predictor.labels[found.label_index],
        found.probability,
        "integrated_gradients",
        delta=found.delta,
        baseline_probability=found.baseline_probability,
    )
