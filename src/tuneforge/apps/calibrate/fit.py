"""Fit a run's temperature on a labelled file with the model the run serves, and write it into the run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data import read_eval_file
from tuneforge.errors import RunDirError
from tuneforge.files import atomic_write_json
from tuneforge.infer.calibration import (
    Calibration,
    fit_calibration,
    load_calibration,
    plot_reliability,
    save_calibration,
)
from tuneforge.infer.evaluate import eval_data_config
from tuneforge.infer.openset import load_detector
from tuneforge.infer.predictor import Predictor


@dataclass(frozen=True)
class CalibrateResult:
    calibration: Calibration
    previous_temperature: float | None  # None: the run had no (readable) calibration
    written: list[Path]
    notes: list[str]


def _read_metrics(path: Path) -> dict[str, Any]:
    """The run's metrics.json, to add the calibration to; checked before anything is fitted or written."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc}); the calibration's figures would have to replace it") from None
    if not isinstance(metrics, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return metrics


def _previous_temperature(run_path: Path, notes: list[str]) -> float | None:
    try:
        previous = load_calibration(run_path)
    except RunDirError as exc:
        notes.append(f"replacing a damaged calibration: {exc}")
        return None
    return previous.temperature if previous is not None else None


def calibrate_file(
    run_dir: Path | str,
    data_path: Path | str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    encoding: str | None = None,
) -> CalibrateResult:
    """Fit the temperature of ``run_dir`` (any form: PyTorch, ONNX, int8) on the labelled ``data_path``;
    write ``calibration.json``, ``calibration.png`` and metrics.json's ``calibration`` into the run."""
    # Raw logits, and the run's current calibration ignored: a damaged one is what this replaces.
    predictor = Predictor(run_dir, open_set=False, calibrated=False)
    run = predictor.run
    metrics = _read_metrics(run.metrics_file)
    notes: list[str] = []
    previous = _previous_temperature(run.path, notes)
    data_cfg = eval_data_config(predictor, data_path, text_column, label_column, encoding)
    data = read_eval_file(Path(data_path), data_cfg, predictor.labels)
    index = {label: i for i, label in enumerate(predictor.labels)}
    truth = np.array([index[y] for y in data.labels], dtype=np.int64)
    logits = predictor.logits(data.texts)
    fitted_on = {"data": str(Path(data_path).resolve()), "form": predictor.form, "variant": run.variant().get("name")}
    calibration = fit_calibration(logits, truth, fitted_on)

    save_calibration(run.path, calibration)
    plot_reliability(
        logits, truth, calibration.temperature, run.calibration_png, f"{Path(data_path).stem}: reliability"
    )
    metrics["calibration"] = {
        "temperature": calibration.temperature,
        "fitted_on": calibration.fitted_on,
        "data": {"before": calibration.before, "after": calibration.after},
    }
    atomic_write_json(run.metrics_file, metrics)
    try:
        detector = load_detector(run.path, predictor.labels)
    except RunDirError:
        detector = None
    if detector is not None and detector.method in ("msp", "energy"):
        notes.append(
            f"the {detector.method} out-of-scope detector keeps the temperature it was fitted at "
            f"({detector.temperature or 1.0:g}); run tuneforge intent fit to fit its threshold on the new probabilities"
        )
    return CalibrateResult(calibration, previous, [run.calibration_file, run.calibration_png, run.metrics_file], notes)
