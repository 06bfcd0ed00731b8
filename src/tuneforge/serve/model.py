"""The model a server runs: what it needs from it, how it is loaded, and how it is described."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

import tuneforge
from tuneforge.errors import RunDirError
from tuneforge.rundir import RunDir
from tuneforge.serve.settings import ServeSettings

if TYPE_CHECKING:
    from tuneforge.infer.openset import OpenSetDetector
    from tuneforge.infer.predictor import Prediction

# Files that identify a trained model without reading its weights: a retrained or re-optimized run
# changes at least one of them (metrics.json records the run's own measurements).
_VERSION_FILES = ("labels.json", "config.yaml", "variant.json", "metrics.json")
# Hashed only when present, so that a run without a detector keeps the version it had before; a
# refit writes new thresholds and validation figures into it, so the version changes with the detector.
_DETECTOR_FILE = "intent/detector.json"


class ServableModel(Protocol):
    """What the server needs: :class:`tuneforge.infer.predictor.Predictor` is one.

    A model may also have a ``detector`` (not None: the run has an out-of-scope detector); it then
    needs :meth:`OpenSetModel.predict` too. Test doubles without a ``detector`` classify as before.
    """

    labels: list[str]
    form: str

    def predict_proba(self, texts: list[str]) -> Sequence[Sequence[float]] | np.ndarray: ...


class OpenSetModel(ServableModel, Protocol):
    """A model whose run has an out-of-scope detector: each answer carries a decision."""

    detector: OpenSetDetector | None

    def predict(self, texts: list[str], *, top_k: int = 1) -> list[Prediction]: ...


def detector_of(model: ServableModel) -> OpenSetDetector | None:
    return getattr(model, "detector", None)


@dataclass(frozen=True)
class OpenSetAnswers:
    """One batch's answers from a model with a detector: what the batcher slices by request.

    ``probabilities``: the trained labels' probabilities (texts x labels), for ``top_k``;
    ``predictions``: one per text, with its decision, score and candidates.
    """

    probabilities: np.ndarray
    predictions: list[Prediction]

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, index: slice) -> OpenSetAnswers:
        return OpenSetAnswers(self.probabilities[index], self.predictions[index])


def answer_batch(model: ServableModel) -> Callable[[list[str]], np.ndarray | OpenSetAnswers]:
    """The function that answers one batch of texts: probabilities only, unless the run has a detector."""
    detector = detector_of(model)
    if detector is None:
        # The plain path: one array, no per-text objects (batched classification's throughput).
        def probabilities(texts: list[str]) -> np.ndarray:
            return np.asarray(model.predict_proba(texts), dtype=np.float32)

        return probabilities
    open_set: OpenSetModel = model  # type: ignore[assignment]
    index = {label: j for j, label in enumerate(model.labels)}

    def answer(texts: list[str]) -> OpenSetAnswers:
        # Every trained label's probability comes back in top_k, so each request can rank its own top_k.
        predictions = open_set.predict(texts, top_k=len(model.labels))
        probabilities = np.zeros((len(predictions), len(model.labels)), dtype=np.float32)
        for i, prediction in enumerate(predictions):
            for label, probability in prediction.top_k:
                probabilities[i, index[label]] = probability
        return OpenSetAnswers(probabilities, predictions)

    return answer


def describe_detector(detector: OpenSetDetector | None) -> dict[str, Any] | None:
    if detector is None:
        return None
    return {
        "method": detector.method,
        "oos_label": detector.oos_label,
        "threshold": detector.threshold,
        "ambiguity_margin": detector.ambiguity_margin,
        "added_intents": [intent.label for intent in detector.added],
    }


def load_predictor(settings: ServeSettings) -> ServableModel:
    from tuneforge.infer.predictor import Predictor

    # The server forms its own batches; the Predictor's batch size only caps one forward pass.
    # No spinning: idle ONNX Runtime threads would busy-wait on the cores the event loop needs.
    return Predictor(
        settings.run_dir,
        threads=settings.threads,
        form=settings.form,
        batch_size=64,
        spin=False,
        device=settings.device,
    )


def run_version(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _VERSION_FILES:
        path = run_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    detector = run_dir / _DETECTOR_FILE
    if detector.is_file():
        digest.update(_DETECTOR_FILE.encode())
        digest.update(detector.read_bytes())
    return digest.hexdigest()[:12]


def describe_model(settings: ServeSettings, model: ServableModel) -> dict[str, Any]:
    run = RunDir(settings.run_dir)
    try:
        variant = run.variant()
    except Exception:  # a damaged variant.json must not stop a model that loaded from being served
        variant = {}
    try:
        config = run.config_or_none()
    except RunDirError:  # the model loaded without it; describing the model must not fail on it
        config = None
    return {
        "labels": list(model.labels),
        "num_labels": len(model.labels),
        "form": model.form,
        "variant": variant.get("name"),
        "quantize": variant.get("quantize"),
        "base_model": config.model.name if config else None,
        "max_length": config.model.max_length if config else None,
        "version": run_version(run.path),
        "run_dir": run.path.name,
        "tuneforge_version": tuneforge.__version__,
        "detector": describe_detector(detector_of(model)),
        "limits": {
            "max_texts_per_request": settings.max_texts_per_request,
            "max_chars": settings.max_chars,
            "truncate": settings.truncate,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
        },
    }
