"""Fit the out-of-scope detector of a trained run, after training, and write it into the run directory.

Statistics come from the run's own training split (re-made from its config and seed), scored by the
very model the run serves (an optimized variant's own features, not its source's). The threshold comes
from held-out texts: the run's validation split, or ``--data FILE`` (a file of out-of-scope texts only
joins the validation split). When the held-out texts include some labelled with the OOS label, the
threshold is the one that maximises macro-F1 over the known intents + open on them, and
``method="auto"`` takes the method with the best AUROC there; without OOS examples the threshold
keeps ``target_recall`` of the in-scope texts in scope and ``auto`` means Mahalanobis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import f1_score, roc_auc_score

from tuneforge.apps.intent.added import prototype
from tuneforge.data import LabelledTexts, prepare_data, read_eval_file
from tuneforge.errors import DataError, RunDirError, TuneforgeError
from tuneforge.infer.evaluate import eval_data_config
from tuneforge.infer.openset import (
    METHODS,
    AddedIntent,
    OpenSetDetector,
    load_detector,
    method_scores,
    normalise_rows,
    save_detector,
)
from tuneforge.infer.predictor import Predictor
from tuneforge.models.loading import softmax

DEFAULT_METHOD = "mahalanobis"
DEFAULT_OOS_LABEL = "oos"
_THRESHOLD_CANDIDATES = 200


@dataclass(frozen=True)
class FitOptions:
    """``oos_label=None``: texts labelled ``oos`` are OOS examples if the data has any; a label given
    explicitly must occur in the data."""

    method: str = "auto"
    oos_label: str | None = None
    target_recall: float = 0.95
    ambiguity_margin: float = 0.25
    k: int = 10

    def check(self) -> FitOptions:
        if self.method not in ("auto", *METHODS):
            raise TuneforgeError(f"method: one of auto, {', '.join(METHODS)}; not {self.method!r}")
        if not 0.5 <= self.target_recall < 1.0:
            raise TuneforgeError(f"target recall: must be in [0.5, 1), got {self.target_recall}")
        if not 0.0 <= self.ambiguity_margin < 1.0:
            raise TuneforgeError(f"ambiguity margin: must be in [0, 1), got {self.ambiguity_margin}")
        if self.k < 1:
            raise TuneforgeError(f"k: must be at least 1, got {self.k}")
        return self


def class_statistics(features: np.ndarray, label_ids: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of one covariance shared by the classes (Ledoit-Wolf shrinkage, so
    that 384 dimensions estimated from a few thousand texts still give a well-conditioned inverse)."""
    means = np.stack([features[label_ids == c].mean(axis=0) for c in range(n_classes)])
    centred = features - means[label_ids]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    return means.astype(np.float32), np.linalg.pinv(covariance)


def recall_threshold(in_scope_scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold that keeps at least ``target_recall`` of these in-scope scores in scope."""
    ordered = np.sort(in_scope_scores)
    return float(ordered[int(np.floor((1.0 - target_recall) * len(ordered)))])


def best_f1_threshold(scores: np.ndarray, predicted: np.ndarray, truth: np.ndarray, open_id: int) -> float:
    """The threshold maximising macro-F1 over known + open when texts scoring below it are called open."""
    candidates = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, _THRESHOLD_CANDIDATES)))
    classes = np.unique(np.concatenate([truth, [open_id]]))

    def f1_at(threshold: float) -> float:
        guess = np.where(scores >= threshold, predicted, open_id)
        return float(f1_score(truth, guess, labels=classes, average="macro", zero_division=0))

    return float(max(candidates, key=f1_at))


def _held_out(
    predictor: Predictor, data: Path | None, oos_label: str | None, validation: LabelledTexts | None
) -> tuple[LabelledTexts, str]:
    label = oos_label or DEFAULT_OOS_LABEL
    if label in predictor.labels:
        raise DataError(
            f"OOS label '{label}': the model was trained with it as an intent; a detector rejects texts unlike "
            "every trained intent, so train without those texts and pass them with --data instead"
        )
    if data is None:
        if oos_label is not None:
            raise DataError(f"--oos-label {oos_label}: needs --data FILE with texts labelled '{oos_label}'")
        if validation is None or not len(validation):
            raise RunDirError(f"{predictor.run.path}: no validation split to fit the threshold on; pass --data FILE")
        return validation, label
    held = read_eval_file(data, eval_data_config(predictor, data, None, None, None), [*predictor.labels, label])
    if oos_label is not None and label not in held.labels:
        raise DataError(f"{data}: no text is labelled '{label}' (--oos-label); nothing to fit the OOS threshold on")
    if all(y == label for y in held.labels):
        # Only out-of-scope examples: the in-scope side of the threshold comes from the validation split.
        if validation is None or not len(validation):
            raise DataError(f"{data}: every text is labelled '{label}'; the threshold needs in-scope texts too")
        held = LabelledTexts(
            texts=validation.texts + held.texts,
            labels=validation.labels + held.labels,
            rows=validation.rows + held.rows,
            source=f"{validation.source} (validation split) + {held.source}",
        )
    return held, label


def _figures(scores: np.ndarray, predicted: np.ndarray, truth: np.ndarray, open_id: int, threshold: float) -> dict:
    is_open = truth == open_id
    accepted = scores >= threshold
    figures: dict[str, Any] = {
        "threshold": round(float(threshold), 6),
        "in_scope_recall": round(100.0 * float(accepted[~is_open].mean()), 2),
        "in_scope_accuracy": round(100.0 * float((accepted & (predicted == truth))[~is_open].mean()), 2),
    }
    if is_open.any():
        guess = np.where(accepted, predicted, open_id)
        figures |= {
            "auroc": round(100.0 * float(roc_auc_score(is_open, -scores)), 2),
            "oos_recall": round(100.0 * float((~accepted[is_open]).mean()), 2),
            "open_set_accuracy": round(100.0 * float((guess == truth).mean()), 2),
        }
    return figures


def fit_detector(
    run_dir: Path | str,
    *,
    data: Path | None = None,
    options: FitOptions | None = None,
    added: list[AddedIntent] | None = None,
) -> OpenSetDetector:
    """Fit, choose and save the detector of ``run_dir`` (see the module docstring); returns it.

    ``added``: intents added from examples, their prototypes computed with this model; ``None`` keeps
    those of the run's current detector (``tuneforge intent add``).
    """
    options = (options or FitOptions()).check()
    predictor = Predictor(run_dir, open_set=False)
    run = predictor.run
    previous = _previous_added(run.path, predictor.labels) if added is None else added
    cfg = run.config()
    try:
        # The test file plays no part; the training data must still be where the run found it.
        prepared = prepare_data(cfg.data.model_copy(update={"test": None}), seed=cfg.train.seed)
    except TuneforgeError as exc:
        raise RunDirError(f"{run.path}: the detector's statistics need the run's training data: {exc}") from None
    held, oos_label = _held_out(predictor, data, options.oos_label, prepared.validation)

    index = {label: i for i, label in enumerate(predictor.labels)}
    open_id = len(predictor.labels)
    _, train_features = predictor.logits_and_features(prepared.train.texts)
    means, precision = class_statistics(train_features, np.array([index[y] for y in prepared.train.labels]), open_id)
    # Only its statistics are used: they score every method on the held-out texts below.
    scoring = OpenSetDetector(
        method="knn",
        threshold=0.0,
        feature_threshold=0.0,
        ambiguity_margin=options.ambiguity_margin,
        labels=predictor.labels,
        oos_label=oos_label,
        means=means,
        precision=precision,
        bank=normalise_rows(train_features),
        k=options.k,
    )
    held_logits, held_features = predictor.logits_and_features(held.texts)
    # Thresholds on the run's calibrated probabilities, as predict shows them; the detector keeps this
    # temperature, so its scores read the logits as they were fitted on even after a recalibration.
    held_logits = held_logits / predictor.temperature
    truth = np.array([index.get(y, open_id) for y in held.labels])
    predicted = held_logits.argmax(axis=1)
    has_oos = bool((truth == open_id).any())

    def threshold_for(scores: np.ndarray) -> float:
        if has_oos:
            return best_f1_threshold(scores, predicted, truth, open_id)
        return recall_threshold(scores[truth != open_id], options.target_recall)

    validation: dict[str, dict] = {}
    thresholds: dict[str, float] = {}
    for method in METHODS:
        scores = method_scores(method, held_logits, held_features, scoring)
        thresholds[method] = threshold_for(scores)
        validation[method] = _figures(scores, predicted, truth, open_id, thresholds[method])
    if options.method != "auto":
        method, chosen_by = options.method, "given"
    elif has_oos:
        method, chosen_by = max(METHODS, key=lambda m: validation[m]["auroc"]), "best AUROC on the OOS examples"
    else:
        method, chosen_by = DEFAULT_METHOD, "default (no OOS examples to compare the methods on)"

    # How the margin splits the held-out in-scope texts the detector keeps: a share small enough to ask
    # about, and less accurate than the rest, is what makes "did you mean A or B?" worth asking.
    top_two = np.sort(softmax(held_logits), axis=1)[:, -2:]
    kept = (truth != open_id) & (method_scores(method, held_logits, held_features, scoring) >= thresholds[method])
    unsure = kept & (top_two[:, 1] - top_two[:, 0] < options.ambiguity_margin)
    sure = kept & ~unsure
    correct = predicted == truth
    ambiguity = {
        "margin": options.ambiguity_margin,
        "ambiguous_share": round(100.0 * float(unsure.sum() / max(kept.sum(), 1)), 2),
        "accuracy_when_ambiguous": round(100.0 * float(correct[unsure].mean()), 2) if unsure.any() else None,
        "accuracy_otherwise": round(100.0 * float(correct[sure].mean()), 2) if sure.any() else None,
    }
    detector = OpenSetDetector(
        method=method,
        threshold=thresholds[method],
        feature_threshold=thresholds["mahalanobis"],
        ambiguity_margin=options.ambiguity_margin,
        labels=predictor.labels,
        oos_label=oos_label,
        means=means,
        precision=precision,
        bank=scoring.bank if method == "knn" else None,
        k=options.k,
        temperature=predictor.temperature,
        info={
            "options": asdict(options),
            "chosen_by": chosen_by,
            "threshold_rule": "best macro-F1 on the OOS examples"
            if has_oos
            else f"{options.target_recall:.0%} in-scope recall",
            "fitted_on": {
                "form": predictor.form,
                "variant": run.variant().get("name"),
                "training_texts": len(prepared.train),
                "held_out": str(Path(data).resolve()) if data is not None else "the run's validation split",
                "held_out_texts": len(held),
                "held_out_oos_texts": int((truth == open_id).sum()),
            },
            "validation": validation,
            "ambiguity": ambiguity,
        },
    )
    for intent in previous:
        _, features = predictor.logits_and_features(intent.examples)
        centre, threshold = prototype(detector, features)
        detector.means = np.vstack([detector.means, centre[None, :]])
        detector.added.append(AddedIntent(intent.label, intent.examples, threshold))
    save_detector(run.path, detector)
    return detector


def _previous_added(run_path: Path, labels: list[str]) -> list[AddedIntent]:
    try:
        previous = load_detector(run_path, labels)
    except RunDirError:
        return []  # a damaged or mismatched detector is replaced; there is nothing to keep from it
    return list(previous.added) if previous is not None else []


def refit_like(run_dir: Path | str, source_run: Path | str) -> OpenSetDetector | None:
    """Fit ``run_dir`` (an optimized variant) with the options and the method of ``source_run``'s detector,
    on its own features; the intents added to the source come along. ``None`` when the source has no
    detector."""
    source = Predictor(source_run, open_set=False).run
    detector = load_detector(source.path, source.labels())
    if detector is None:
        return None
    saved = detector.info.get("options", {})
    options = FitOptions(**{key: saved[key] for key in FitOptions.__dataclass_fields__ if key in saved})
    # The source's method, not "auto" again: the variant replaces the source, so it should decide the
    # same way; a new AUROC contest on int8 features can tip a near-tie to another method.
    options = replace(options, method=detector.method)
    held_out = detector.info.get("fitted_on", {}).get("held_out", "")
    data = Path(held_out) if held_out and Path(held_out).is_file() else None
    return fit_detector(run_dir, data=data, options=options, added=list(detector.added))
