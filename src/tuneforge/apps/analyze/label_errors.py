"""Probable label errors: confident learning (cleanlab) on out-of-sample probabilities.

A model's probabilities for the texts it was trained on are no evidence about their labels: it has learned
those labels, wrong ones included. Confident learning needs *out-of-sample* probabilities. For a held-out
file the run's own probabilities are that already. For the training data, k full fine-tunings would be;
instead a cheap head (standardised features, logistic regression) is fitted k times on the frozen run's
features, each fold predicted by the head that did not see it: seconds to minutes, not k trainings.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tuneforge.errors import DataError

DEFAULT_FOLDS = 5
# cleanlab's ways of choosing the set of issues (filter_by); prune_by_noise_rate is its default.
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
# The head's inverse regularisation strength on standardised features (scikit-learn's default, as in
# cleanlab's examples). A stronger one (0.1) ranks the suspects as well but makes the probabilities so soft
# that cleanlab's per-class thresholds keep fewer of them: 5 of 10 flipped rows found in a test, not 7.
HEAD_C = 1.0
HEAD_MAX_ITER = 500


@dataclass(frozen=True)
class Suspect:
    """One text whose given label the probabilities contradict.

    ``index``: position in the data as read; ``row``: its row in the file (1-based, header excluded; the line
    for JSONL); ``confidence``: the out-of-sample probability of ``suggested_label``; ``given_probability``:
    that of ``given_label`` (the self-confidence the suspects are ranked by, lowest first)."""

    index: int
    row: int
    text: str
    given_label: str
    suggested_label: str
    confidence: float
    given_probability: float


def check_folds(labels: Sequence[int], folds: int, names: Sequence[str]) -> int:
    """The folds to use: ``folds``, or fewer when the smallest label has fewer texts than that (each fold
    must hold out at least one text of every label); a label with a single text cannot be held out at all."""
    if folds < 2:
        raise DataError(f"folds: must be at least 2, got {folds}")
    counts = Counter(int(label) for label in labels)
    single = sorted(names[label] for label, count in counts.items() if count < 2)
    if single:
        shown = ", ".join(repr(name) for name in single[:10]) + (
            f" and {len(single) - 10} more" if len(single) > 10 else ""
        )
        raise DataError(
            f"label errors: {len(single)} label(s) have a single text ({shown}); cross-validation needs at "
            "least two texts of each label: add examples, or drop those rows"
        )
    return min(folds, min(counts.values()))


def cross_validated_probabilities(
    features: np.ndarray,
    labels: Sequence[int],
    num_labels: int,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    c: float = HEAD_C,
) -> np.ndarray:
    """Out-of-sample probabilities (texts × ``num_labels``) from a logistic-regression head, k-fold stratified.

    Every text is predicted by a head fitted on the other folds; labels absent from ``labels`` get 0.
    ``folds`` must already be checked (:func:`check_folds`).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features of shape {x.shape} for {len(y)} labels")
    out = np.zeros((len(y), num_labels), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_idx, held_idx in splitter.split(x, y):
        head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=HEAD_MAX_ITER))
        with warnings.catch_warnings():
            # Not converging within HEAD_MAX_ITER changes the ranking little; the warning would only alarm.
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            head.fit(x[fit_idx], y[fit_idx])
        out[np.ix_(held_idx, head.classes_)] = head.predict_proba(x[held_idx])
    return out


def find_label_issues(
    labels: Sequence[int], probabilities: np.ndarray, *, filter_by: str = "prune_by_noise_rate"
) -> np.ndarray:
    """Indices of probable label errors, most probable first (lowest probability of the given label).

    cleanlab needs every column's label among ``labels``: the probabilities are restricted to the labels
    present (and renormalised), so a file holding some of a run's labels works as well as one holding all.
    """
    from cleanlab.filter import find_label_issues as cleanlab_find

    if filter_by not in FILTERS:
        raise DataError(f"filter_by: unknown {filter_by!r}; one of {', '.join(FILTERS)}")
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    present = np.unique(y)
    if len(present) < 2:
        raise DataError("label errors: the data holds a single label; finding label errors needs at least two")
    remap = np.full(p.shape[1], -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    restricted = p[:, present]
    restricted = np.clip(restricted, 1e-12, None)
    restricted /= restricted.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        # "May not flag all label issues in class k, it has too few examples": true, and said in the docs.
        warnings.simplefilter("ignore", category=UserWarning)
        found = cleanlab_find(
            remap[y], restricted, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1
        )
    return np.asarray(found, dtype=np.int64)


def suspects_from(
    found: Sequence[int],
    probabilities: np.ndarray,
    labels: Sequence[int],
    names: Sequence[str],
    texts: Sequence[str],
    rows: Sequence[int],
) -> list[Suspect]:
    """:class:`Suspect` records for ``found`` (in its order); the suggestion is the most probable other label."""
    p = np.asarray(probabilities, dtype=np.float64)
    out = []
    for i in found:
        given = int(labels[i])
        others = p[i].copy()
        others[given] = -1.0
        suggested = int(np.argmax(others))
        out.append(
            Suspect(
                index=int(i),
                row=int(rows[i]),
                text=texts[i],
                given_label=names[given],
                suggested_label=names[suggested],
                confidence=float(p[i, suggested]),
                given_probability=float(p[i, given]),
            )
        )
    return out
