"""Classification metrics and the confusion-matrix plot (shared by training and evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from tuneforge.files import atomic_write_with


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 in percent, per-class precision/recall/F1, and the confusion matrix."""
    indices = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=indices, zero_division=0)
    return {
        "accuracy": round(100.0 * accuracy_score(y_true, y_pred), 3),
        "macro_f1": round(100.0 * f1_score(y_true, y_pred, labels=indices, average="macro", zero_division=0), 3),
        "n": len(y_true),
        "per_class": {
            label: {
                "precision": round(float(p), 4),
                "recall": round(float(r), 4),
                "f1": round(float(f), 4),
                "support": int(s),
            }
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=indices).tolist(),
    }


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Save a row-normalised confusion matrix as PNG; counts are annotated when the grid is small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(labels)
    size = min(4 + 0.28 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=max(4, 10 - n // 12))
    ax.set_yticks(range(n), labels, fontsize=max(4, 10 - n // 12))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
