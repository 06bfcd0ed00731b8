"""New intents from a handful of examples, without retraining: a prototype (the mean of the examples'
features) that the detector recognises at once beside the trained intents (see tuneforge.infer.openset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tuneforge.errors import DataError, RunDirError
from tuneforge.infer.openset import AddedIntent, OpenSetDetector, save_detector
from tuneforge.infer.predictor import Predictor

MIN_EXAMPLES = 5
MAX_EXAMPLES = 200


def prototype(detector: OpenSetDetector, features: np.ndarray) -> tuple[np.ndarray, float]:
    """The prototype of an intent's examples (their mean feature vector) and its own in-scope threshold:
    as far as its farthest example lies from the mean of the others (leave-one-out), never stricter
    than the trained classes' threshold."""
    n = len(features)
    centre = features.mean(axis=0)
    # Example i minus the mean of the other n - 1 is n / (n - 1) times example i minus the mean of all.
    apart = (features - centre) * (n / (n - 1))
    farthest = float(np.einsum("ij,jk,ik->i", apart, detector.precision, apart).max())
    return centre.astype(np.float32), min(detector.feature_threshold, -farthest)


def _detector(predictor: Predictor) -> OpenSetDetector:
    if predictor.detector is None:
        raise RunDirError(f"{predictor.run.path}: no out-of-scope detector yet; run tuneforge intent fit first")
    return predictor.detector


def add_intent(run_dir: Path | str, label: str, examples: list[str]) -> OpenSetDetector:
    """Add intent ``label`` from ``examples`` (5-200 distinct texts) to the run's detector; returns it."""
    label = label.strip()
    if not label:
        raise DataError("--label: the new intent needs a name")
    distinct = list(dict.fromkeys(text.strip() for text in examples if text.strip()))
    if len(distinct) < MIN_EXAMPLES:
        raise DataError(
            f"intent '{label}': {len(distinct)} distinct example(s); at least {MIN_EXAMPLES} are needed for a "
            "prototype that stands for the intent rather than for one phrasing"
        )
    if len(distinct) > MAX_EXAMPLES:
        raise DataError(
            f"intent '{label}': {len(distinct)} examples; with more than {MAX_EXAMPLES}, train the intent instead"
        )
    predictor = Predictor(run_dir)
    detector = _detector(predictor)
    if label in detector.all_labels or label == detector.oos_label:
        kind = "the OOS label" if label == detector.oos_label else "an intent already"
        raise DataError(f"intent '{label}': is {kind}; remove it first or choose another name")
    # The Predictor cleans them as it cleans every text, so the prototype sits where those texts land.
    _, features = predictor.logits_and_features(distinct)
    centre, threshold = prototype(detector, features)
    detector.means = np.vstack([detector.means, centre[None, :]]).astype(np.float32)
    detector.added.append(AddedIntent(label, distinct, threshold))
    save_detector(predictor.run.path, detector)
    return detector


def remove_intent(run_dir: Path | str, label: str) -> OpenSetDetector:
    """Remove an intent added with :func:`add_intent` (trained intents need retraining to go)."""
    predictor = Predictor(run_dir)
    detector = _detector(predictor)
    names = [intent.label for intent in detector.added]
    if label not in names:
        if label in detector.labels:
            raise DataError(f"intent '{label}': a trained intent; only intents added from examples can be removed")
        shown = ", ".join(names) if names else "none"
        raise DataError(f"intent '{label}': not an added intent (added: {shown})")
    row = len(detector.labels) + names.index(label)
    detector.means = np.delete(detector.means, row, axis=0)
    del detector.added[names.index(label)]
    save_detector(predictor.run.path, detector)
    return detector
