"""Data augmentation with a model in the loop: embedding-neighbour substitution, the label-preservation
filter, and the pipeline that ``tuneforge augment`` and inline augmentation in training (``data.augment``)
share.

The operations themselves are model-free and live in :mod:`tuneforge.data.augment`; this package adds
what needs a model (a word-embedding space, a classifier that must still agree with each label) and the
pipeline with its report. It sits below training (which augments inline) and above inference (whose
Predictor the label filter uses).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Loaded on first use: importing the package must not pay for torch, transformers or llama.cpp.
_EXPORTS = {
    "EmbeddingNeighbours": "neighbours",
    "load_neighbours": "neighbours",
    "Paraphraser": "paraphrase",
    "load_paraphraser": "paraphrase",
    "AugmentOptions": "pipeline",
    "AugmentResult": "pipeline",
    "LabelFilter": "pipeline",
    "augment_file": "pipeline",
    "augment_texts": "pipeline",
    "report_path": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"tuneforge.augment.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tuneforge.augment' has no attribute {name!r}")
