"""Sentiment of items with any run directory (PyTorch, adapter, ONNX, the optimized int8 variant), batched
through the inference engine (:class:`tuneforge.infer.predictor.Predictor`).

What is stored per item: the top label and its probability (calibrated when the run has a calibration,
which the Predictor applies), the summed probability of the labels whose role is positive and of those
whose role is negative, the signed sentiment (positive minus negative, in [-1, 1]) and the role with the
largest summed probability (what the negative share counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tuneforge.apps.monitor.config import ROLES, ScoringConfig
from tuneforge.apps.monitor.items import Item
from tuneforge.apps.monitor.store import ScoredItem
from tuneforge.errors import ConfigError
from tuneforge.infer.predictor import Predictor
from tuneforge.rundir import open_run_dir


class ItemScorer(Protocol):
    def score(self, items: Sequence[Item]) -> list[ScoredItem]: ...

    def identity(self) -> dict[str, Any]: ...


def label_roles(labels: Sequence[str], mapping: Mapping[str, str] | None, run_path: Path) -> dict[str, str]:
    """Each run label's role (positive, negative, neutral), checked against the run's labels.json."""
    if mapping is None:
        roles = {label: label.lower() for label in labels}
        odd = [label for label, role in roles.items() if role not in ROLES]
        if odd:
            example = ", ".join(f"{label}: ..." for label in labels[:3])
            raise ConfigError(
                f"scoring.labels: {run_path} has the labels {', '.join(labels)}, not positive/negative/neutral; "
                f"give each its role, e.g. scoring.labels: {{{example}}}"
            )
    else:
        unknown = [label for label in mapping if label not in labels]
        if unknown:
            raise ConfigError(
                f"scoring.labels: {', '.join(map(repr, unknown))} not a label of {run_path} "
                f"(its labels: {', '.join(labels)})"
            )
        unmapped = [label for label in labels if label not in mapping]
        if unmapped:
            raise ConfigError(
                f"scoring.labels: the run's label(s) {', '.join(map(repr, unmapped))} have no role; "
                "give each one positive, negative or neutral"
            )
        roles = dict(mapping)
    missing = [role for role in ("positive", "negative") if role not in roles.values()]
    if missing:
        raise ConfigError(f"scoring.labels: no label of {run_path} has the role {' or '.join(missing)}")
    return roles


class Scorer:
    """Loads the run once; ``score`` answers a batch of items."""

    def __init__(self, config: ScoringConfig) -> None:
        run = open_run_dir(config.run)
        # Checked before the model loads (seconds): a wrong mapping fails at once.
        self.roles = label_roles(run.labels(), config.labels, run.path)
        self.predictor = Predictor(
            config.run, threads=config.threads, batch_size=config.batch_size, form=config.form, open_set=False
        )
        labels = self.predictor.labels
        self._positive = [i for i, label in enumerate(labels) if self.roles[label] == "positive"]
        self._negative = [i for i, label in enumerate(labels) if self.roles[label] == "negative"]
        self._neutral = [i for i, label in enumerate(labels) if self.roles[label] == "neutral"]
        self.calibrated = getattr(self.predictor, "calibration", None) is not None

    def identity(self) -> dict[str, Any]:
        """What the store records about the scoring, so that two models never mix in one store."""
        return {"run": str(self.predictor.run.path.resolve()), "form": self.predictor.form, "roles": self.roles}

    def score(self, items: Sequence[Item]) -> list[ScoredItem]:
        if not items:
            return []
        probabilities = np.asarray(self.predictor.predict_proba([item.text for item in items]), dtype=np.float64)
        return score_rows(probabilities, items, self.predictor.labels, self._positive, self._negative, self._neutral)


def score_rows(
    probabilities: np.ndarray,
    items: Sequence[Item],
    labels: Sequence[str],
    positive: Sequence[int],
    negative: Sequence[int],
    neutral: Sequence[int],
) -> list[ScoredItem]:
    """The stored answer for each row of probabilities (one row per item, one column per label)."""
    p_positive = probabilities[:, positive].sum(axis=1)
    p_negative = probabilities[:, negative].sum(axis=1)
    p_neutral = probabilities[:, neutral].sum(axis=1) if neutral else np.zeros(len(items))
    # The role with the most probability mass (ties: positive, then negative, then neutral).
    roles = np.argmax(np.stack([p_positive, p_negative, p_neutral], axis=1), axis=1)
    top = np.argmax(probabilities, axis=1)
    return [
        ScoredItem(
            item=item,
            label=labels[int(top[i])],
            probability=float(probabilities[i, top[i]]),
            p_positive=float(p_positive[i]),
            p_negative=float(p_negative[i]),
            sentiment=("positive", "negative", "neutral")[int(roles[i])],
        )
        for i, item in enumerate(items)
    ]
