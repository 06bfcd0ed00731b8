"""The run's outputs for a list of texts: raw logits and the pooled features its classifier head reads.

Texts go through the model in chunks, longest first (less padding per batch), with a progress bar: on a
laptop CPU the feature pass over 10,000 texts is the slow part of an analysis (a few minutes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

CHUNK = 256


def logits_and_features(
    predictor: Any,
    texts: Sequence[str],
    *,
    show_progress: bool = False,
    console: Console | None = None,
    chunk: int = CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """``predictor.logits_and_features`` over ``texts``, in their order (a Predictor, any form with features)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    logits: np.ndarray | None = None
    features: np.ndarray | None = None
    progress = Progress(
        TextColumn("features"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not show_progress,
        transient=True,
    )
    with progress:
        task = progress.add_task("features", total=len(texts))
        for start in range(0, len(order), chunk):
            indices = order[start : start + chunk]
            part_logits, part_features = predictor.logits_and_features([texts[i] for i in indices])
            if logits is None or features is None:
                logits = np.zeros((len(texts), part_logits.shape[1]), dtype=np.float32)
                features = np.zeros((len(texts), part_features.shape[1]), dtype=np.float32)
            logits[indices] = part_logits
            features[indices] = part_features
            progress.advance(task, len(indices))
    if logits is None or features is None:
        raise ValueError("no texts to run the model on")
    return logits, features
