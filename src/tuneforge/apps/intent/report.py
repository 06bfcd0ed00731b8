"""Evaluation that counts out-of-scope texts: a labelled file whose OOS texts carry the OOS label."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

from tuneforge.data import read_eval_file
from tuneforge.errors import DataError, RunDirError
from tuneforge.files import atomic_write_json, atomic_write_with
from tuneforge.infer.evaluate import eval_data_config
from tuneforge.infer.openset import OpenSetDetector
from tuneforge.infer.predictor import Predictor


def open_set_metrics(
    truth: list[str], predicted: list[str], scores: np.ndarray, oos_label: str, known: list[str]
) -> dict[str, Any]:
    """In-scope accuracy, OOS precision/recall/F1, AUROC, FPR at 95% in-scope recall, open-set accuracy and
    macro-F1 over the known intents + open, in percent. ``scores``: in-scope scores (higher = in scope)."""
    truth_a, predicted_a = np.asarray(truth), np.asarray(predicted)
    is_open = truth_a == oos_label
    pct = lambda value: round(100.0 * float(value), 2)  # noqa: E731
    if is_open.all():
        raise DataError(f"every text is labelled '{oos_label}': open-set metrics need in-scope texts too")
    in_scope = {
        "n": len(truth),
        "n_oos": int(is_open.sum()),
        "in_scope_accuracy": pct((predicted_a[~is_open] == truth_a[~is_open]).mean()),
        "in_scope_recall": pct((predicted_a[~is_open] != oos_label).mean()),
    }
    if not is_open.any():
        return in_scope  # nothing out of scope to score the rejection on
    precision, recall, f1, _ = precision_recall_fscore_support(
        is_open, predicted_a == oos_label, average="binary", zero_division=0
    )
    # The threshold that keeps 95% of the in-scope texts: how many OOS texts does it let through?
    in_scores = np.sort(scores[~is_open])
    t95 = in_scores[int(np.floor(0.05 * len(in_scores)))]
    fpr95 = float((scores[is_open] >= t95).mean())
    classes = [label for label in known if label in set(truth_a)] + [oos_label]
    return {
        **in_scope,
        "open_set_accuracy": pct(accuracy_score(truth_a, predicted_a)),
        "open_set_macro_f1": pct(f1_score(truth_a, predicted_a, labels=classes, average="macro", zero_division=0)),
        "oos_precision": pct(precision),
        "oos_recall": pct(recall),
        "oos_f1": pct(f1),
        "auroc": pct(roc_auc_score(is_open, -scores)),
        "fpr_at_95_in_scope_recall": pct(fpr95),
        "oos_recall_at_95_in_scope_recall": pct(1.0 - fpr95),
    }


def plot_score_histogram(scores: np.ndarray, is_open: np.ndarray, threshold: float, path: Path, title: str) -> None:
    """In-scope and OOS score histograms on one axis, the detector's threshold drawn across them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=50)
    ax.hist(scores[~is_open], bins=bins, alpha=0.6, label=f"in scope ({int((~is_open).sum())})", color="tab:blue")
    ax.hist(scores[is_open], bins=bins, alpha=0.6, label=f"out of scope ({int(is_open.sum())})", color="tab:red")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("in-scope score (higher: more like the trained intents)")
    ax.set_ylabel("texts")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def evaluate_open_set(
    run_dir: Path | str,
    data_path: Path | str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    encoding: str | None = None,
    out_dir: Path | None = None,
    predictor: Predictor | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score ``data_path`` (known intents + texts labelled with the detector's OOS label) with the run's
    intent engine; write ``<out_dir>/<stem>.json`` and the score histogram ``<stem>-scores.png``."""
    predictor = predictor or Predictor(run_dir)
    detector: OpenSetDetector | None = predictor.detector
    if detector is None:
        raise RunDirError(f"{predictor.run.path}: no out-of-scope detector; run tuneforge intent fit first")
    cfg = eval_data_config(predictor, data_path, text_column, label_column, encoding)
    data = read_eval_file(Path(data_path), cfg, [*detector.all_labels, detector.oos_label])
    logits, features = predictor.logits_and_features(data.texts)
    decisions = detector.decide(logits, features, temperature=predictor.temperature)
    scores = detector.scores(logits, features)
    metrics = open_set_metrics(
        data.labels, [d.label for d in decisions], scores, detector.oos_label, detector.all_labels
    )
    metrics |= {
        "method": detector.method,
        "threshold": detector.threshold,
        "decisions": {
            kind: sum(d.decision == kind for d in decisions) for kind in ("in_scope", "out_of_scope", "ambiguous")
        },
        "data": str(data_path),
    }
    out_dir = out_dir or predictor.run.path / "evaluations"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(data_path).stem
    atomic_write_json(out_dir / f"{stem}.json", metrics)
    is_open = np.asarray(data.labels) == detector.oos_label
    metrics["score_histogram"] = str(out_dir / f"{stem}-scores.png")
    plot_score_histogram(
        scores, is_open, detector.threshold, out_dir / f"{stem}-scores.png", f"{stem}: {detector.method} scores"
    )
    return metrics, out_dir / f"{stem}.json"
