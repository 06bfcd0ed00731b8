"""Calibrated probabilities: temperature scaling (Guo et al. 2017), its figures, its file in the run.

A fine-tuned classifier's softmax is rarely honest: label smoothing makes it under-confident, long
training over-confident. One scalar ``T`` fitted on held-out texts (minimising their negative
log-likelihood) fixes most of it: the probabilities become ``softmax(logits / T)``. Dividing by a
positive number never changes which label is largest, so accuracy is untouched.

    RUN/calibration.json   temperature, what it was fitted on, ECE/Brier/NLL before and after
    RUN/calibration.png    reliability diagram: confidence against accuracy, before and after

Training fits it on the validation split (``train.calibrate``), ``tuneforge calibrate RUN --data FILE``
on any labelled file, ``tuneforge optimize`` per variant on the texts it measures them on. Every loader
(:class:`tuneforge.infer.predictor.Predictor`, whichever form) reads it; a run without the file keeps
``T = 1``, its raw softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.errors import DataError, RunDirError
from tuneforge.files import atomic_write_json, atomic_write_with
from tuneforge.rundir import CALIBRATION_FILE, read_versioned_json

FORMAT_VERSION = 1
ECE_BINS = 15
# A temperature outside these is a sign of a broken fit (every text right: NLL falls without end as T → 0),
# not of a model that needs it.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
# Probabilities are clipped here for the NLL: one confident mistake must not make it infinite.
_EPS = 1e-12


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature, what it was fitted on, and its figures there (:func:`calibration_metrics`)."""

    temperature: float
    fitted_on: dict[str, Any] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "temperature": self.temperature,
            "fitted_on": self.fitted_on,
            "before": self.before,
            "after": self.after,
        }


# --- fitting and figures --------------------------------------------------------------------------------
def _check(logits: np.ndarray, labels: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(logits, dtype=np.float64)
    truth = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise DataError(f"calibration: expected logits of shape (texts, labels >= 2), got {scores.shape}")
    if len(truth) == 0 or len(scores) == 0:
        raise DataError("calibration: no labelled texts to fit the temperature on")
    if truth.ndim != 1 or len(truth) != len(scores):
        raise DataError(f"calibration: {len(scores)} rows of logits but {truth.size} labels")
    if not np.issubdtype(truth.dtype, np.integer) or truth.min() < 0 or truth.max() >= scores.shape[1]:
        raise DataError(f"calibration: labels must be class indices in [0, {scores.shape[1]})")
    if not np.isfinite(scores).all():
        raise DataError("calibration: the logits hold NaN or infinite values")
    return scores, truth.astype(np.int64)


def fit_temperature(logits: np.ndarray, labels: np.ndarray | list[int]) -> float:
    """The temperature that minimises the NLL of ``softmax(logits / T)`` on these texts.

    The NLL is convex in ``1/T``, so L-BFGS on ``log T`` finds the one minimum; the result is clipped to
    [MIN_TEMPERATURE, MAX_TEMPERATURE]. Texts of a single label are refused: nothing stops the fit from
    sharpening every answer toward that label, a temperature that fails on every other label. So are
    texts the model classifies all right (a small validation split often is): the NLL then falls without
    end as T → 0, and the fit would end at the bound, reporting certainty the texts cannot back.
    """
    import torch

    scores, truth = _check(logits, labels)
    if len(np.unique(truth)) < 2:
        raise DataError(
            f"calibration: all {len(truth)} texts have the same label; the temperature needs texts of at "
            "least two labels"
        )
    if (scores.argmax(axis=1) == truth).all():
        raise DataError(
            f"calibration: the model classifies all {len(truth)} texts right, so the temperature has no best "
            "value (the sharper, the better on these texts); fit it on texts the model sometimes gets wrong: a "
            "larger validation split, or `tuneforge calibrate` with held-out data"
        )
    z = torch.from_numpy(scores)
    y = torch.from_numpy(truth)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z * torch.exp(-log_t), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = math.exp(float(log_t.detach()))
    if not math.isfinite(temperature):
        temperature = MIN_TEMPERATURE if float(log_t.detach()) < 0 else MAX_TEMPERATURE
    return float(min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE))


def scaled_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)``, row by row."""
    from tuneforge.models.loading import softmax

    scores = np.asarray(logits)
    return softmax(scores if temperature == 1.0 else scores / temperature)


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray | list[int]) -> dict[str, float]:
    """How honest ``probabilities`` are about ``labels`` (class indices).

    ``ece``: expected calibration error over 15 equal-width bins of the top-1 confidence (the share of
    texts in each bin times the gap between its mean confidence and its accuracy, summed); ``brier``: the
    multiclass Brier score (squared distance to the one-hot label, summed over classes, averaged over
    texts); ``nll``: mean negative log-probability of the true label; ``accuracy`` in percent, like the
    other metrics of a run; ``n``: texts.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    _, truth = _check(p, labels)
    n = len(truth)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == truth).astype(np.float64)
    # Bin i holds confidences in (i/15, (i+1)/15]; a confidence of exactly 0 (impossible for a softmax) in bin 0.
    bins = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            ece += inside.sum() / n * abs(float(confidence[inside].mean()) - float(correct[inside].mean()))
    one_hot = np.zeros_like(p)
    one_hot[np.arange(n), truth] = 1.0
    return {
        "ece": round(float(ece), 6),
        "brier": round(float(((p - one_hot) ** 2).sum(axis=1).mean()), 6),
        "nll": round(float(-np.log(np.clip(p[np.arange(n), truth], _EPS, 1.0)).mean()), 6),
        "accuracy": round(100.0 * float(correct.mean()), 2),
        "n": n,
    }


def before_after(logits: np.ndarray, labels: np.ndarray | list[int], temperature: float) -> dict[str, dict]:
    """:func:`calibration_metrics` of the raw softmax and of the one scaled by ``temperature``."""
    return {
        "before": calibration_metrics(scaled_probabilities(logits, 1.0), labels),
        "after": calibration_metrics(scaled_probabilities(logits, temperature), labels),
    }


def fit_calibration(logits: np.ndarray, labels: np.ndarray | list[int], fitted_on: dict[str, Any]) -> Calibration:
    """Fit the temperature on ``logits``/``labels`` and measure it there; ``fitted_on`` says what they were."""
    temperature = fit_temperature(logits, labels)
    figures = before_after(logits, labels, temperature)
    return Calibration(
        temperature=round(temperature, 6),
        fitted_on={**fitted_on, "texts": len(labels)},
        before=figures["before"],
        after=figures["after"],
    )


# --- reliability diagram --------------------------------------------------------------------------------
def plot_reliability(
    logits: np.ndarray, labels: np.ndarray | list[int], temperature: float, path: Path, title: str
) -> None:
    """Save a reliability diagram as PNG: per confidence bin, accuracy against mean confidence, for the raw
    softmax and the temperature-scaled one (a calibrated model lies on the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, truth = _check(logits, labels)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for name, t, colour in (("raw", 1.0, "tab:red"), (f"T = {temperature:.3g}", temperature, "tab:blue")):
        p = scaled_probabilities(logits, t)
        confidence, correct = p.max(axis=1), p.argmax(axis=1) == truth
        bins = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
        used = [b for b in range(ECE_BINS) if (bins == b).any()]
        xs = [float(confidence[bins == b].mean()) for b in used]
        ys = [float(correct[bins == b].mean()) for b in used]
        ece = calibration_metrics(p, truth)["ece"]
        ax.plot(xs, ys, marker="o", color=colour, label=f"{name} (ECE {ece:.3f})")
    ax.set_xticks(edges[::3])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# --- the file in the run --------------------------------------------------------------------------------
def calibration_path(run_path: Path | str) -> Path:
    return Path(run_path) / CALIBRATION_FILE


def save_calibration(run_path: Path | str, calibration: Calibration) -> Path:
    """Write ``RUN/calibration.json`` atomically: a reader sees the old temperature or the new one."""
    _check_temperature(calibration.temperature, calibration_path(run_path))
    path = calibration_path(run_path)
    atomic_write_json(path, calibration.to_dict())
    return path


def _check_temperature(value: Any, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise RunDirError(f"{path}: the temperature must be a finite number above 0, not {value!r}")
    return float(value)


def load_calibration(run_path: Path | str) -> Calibration | None:
    """The run's calibration, or ``None`` where it has none; a damaged file is a ``RunDirError``."""
    path = calibration_path(run_path)
    if not path.is_file():
        return None
    hint = "fit it again with tuneforge calibrate RUN --data FILE, or delete it to use the raw probabilities"
    meta = read_versioned_json(path, kind="calibration", version=FORMAT_VERSION, hint=hint)
    try:
        temperature = _check_temperature(meta.get("temperature"), path)
    except RunDirError as exc:
        raise RunDirError(f"{exc}; {hint}") from None
    parts = {key: meta.get(key) or {} for key in ("fitted_on", "before", "after")}
    if not all(isinstance(value, dict) for value in parts.values()):
        raise RunDirError(f"{path}: fitted_on, before and after must be JSON objects; {hint}")
    return Calibration(temperature=temperature, **parts)
