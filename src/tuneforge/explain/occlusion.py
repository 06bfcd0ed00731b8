"""Leave one word out: a word's score is how much the label's probability drops without it.

The text and every variant of it go to the model together, so one explanation is one batch (a model call
of n + 1 short texts), on whatever backend runs the model: PyTorch, ONNX, int8. A word the model cannot
see (cut off by its token limit) scores exactly 0; so does one whose removal changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tuneforge.explain.words import Word, without_word


def occlusion_texts(text: str, words: Sequence[Word]) -> list[str]:
    """The texts one explanation needs: ``text`` itself first, then ``text`` without each word in turn."""
    return [text, *(without_word(text, word) for word in words)]


def occlusion_scores(probabilities: np.ndarray, label_index: int) -> tuple[float, list[float]]:
    """From the probabilities of :func:`occlusion_texts` (rows in that order): p(label | text), and each
    word's score p(label | text) - p(label | text without the word); positive: the word supports the label."""
    column = np.asarray(probabilities, dtype=np.float64)[:, label_index]
    full = float(column[0])
    return full, [full - float(p) for p in column[1:]]
