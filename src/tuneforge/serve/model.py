"""The model a server runs: what it needs from it, how it is loaded, and how it is described."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import tuneforge
from tuneforge.errors import RunDirError
from tuneforge.rundir import RunDir
from tuneforge.serve.settings import ServeSettings

# Files that identify a trained model without reading its weights: a retrained or re-optimized run
# changes at least one of them (metrics.json records the run's own measurements).
_VERSION_FILES = ("labels.json", "config.yaml", "variant.json", "metrics.json")


class ServableModel(Protocol):
    """What the server needs: :class:`tuneforge.infer.predictor.Predictor` is one."""

    labels: list[str]
    form: str

    def predict_proba(self, texts: list[str]) -> Sequence[Sequence[float]] | np.ndarray: ...


def load_predictor(settings: ServeSettings) -> ServableModel:
    from tuneforge.infer.predictor import Predictor

    # The server forms its own batches; the Predictor's batch size only caps one forward pass.
    # No spinning: idle ONNX Runtime threads would busy-wait on the cores the event loop needs.
    return Predictor(settings.run_dir, threads=settings.threads, form=settings.form, batch_size=64, spin=False)


def run_version(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _VERSION_FILES:
        path = run_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
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
        "limits": {
            "max_texts_per_request": settings.max_texts_per_request,
            "max_chars": settings.max_chars,
            "truncate": settings.truncate,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
        },
    }
