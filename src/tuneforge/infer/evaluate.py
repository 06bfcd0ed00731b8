"""Evaluate a trained run on a labelled file: metrics JSON and a confusion-matrix PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config import DataConfig, validate_data_config
from tuneforge.data import read_eval_file
from tuneforge.files import atomic_write_json
from tuneforge.infer.calibration import calibration_metrics
from tuneforge.infer.predictor import Predictor
from tuneforge.metrics import classification_metrics, plot_confusion_matrix


def eval_data_config(
    predictor: Predictor, data_path: Path | str, text_column: str | None, label_column: str | None, encoding: str | None
) -> DataConfig:
    """How to read ``data_path``: the run's own columns, encoding and cleaning, overridden by the options given.

    Only the reading settings are taken from the run, never its files: the training data need not exist.
    """
    config = predictor.run.config_or_none()
    raw = config.data.model_dump() if config else {}
    raw["train"] = Path(data_path)
    for key, value in (("text_column", text_column), ("label_column", label_column), ("encoding", encoding)):
        if value is not None:
            raw[key] = value
    return validate_data_config(raw)


def evaluate_file(
    run_dir: Path | str,
    data_path: Path | str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    encoding: str | None = None,
    out_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score ``data_path`` with the run's model; write ``<out_dir>/<file stem>.json`` and ``.png``.

    ``calibration`` holds the ECE, Brier score and NLL of the probabilities the run reports (calibrated
    with its temperature, if it has one) and that temperature."""
    predictor = Predictor(run_dir)
    data_cfg = eval_data_config(predictor, data_path, text_column, label_column, encoding)
    data = read_eval_file(Path(data_path), data_cfg, predictor.labels)
    index = {label: i for i, label in enumerate(predictor.labels)}
    probabilities = predictor.predict_proba(data.texts)
    predicted = [max(range(len(row)), key=row.__getitem__) for row in probabilities]
    truth = [index[y] for y in data.labels]
    metrics = classification_metrics(truth, predicted, predictor.labels)
    figures = calibration_metrics(np.asarray(probabilities), np.asarray(truth))
    metrics["calibration"] = {
        "temperature": predictor.temperature,
        **{key: figures[key] for key in ("ece", "brier", "nll")},
    }
    metrics["data"] = str(data_path)
    out_dir = out_dir or predictor.run.path / "evaluations"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(data_path).stem
    atomic_write_json(out_dir / f"{stem}.json", metrics)
    plot_confusion_matrix(
        metrics["confusion_matrix"], predictor.labels, out_dir / f"{stem}.png", f"{stem} confusion matrix"
    )
    return metrics, out_dir / f"{stem}.json"
