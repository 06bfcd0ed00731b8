"""The run directory: the contract between pipeline stages, as plain files.

    RUN_DIR/
      model/               Hugging Face folder (config.json, model.safetensors, tokenizer files);
                           AutoModelForSequenceClassification.from_pretrained(RUN_DIR/"model") loads it.
                           Written by full fine-tuning, and by adapter methods with finetune.merge: true
      adapter/             adapter methods only: the adapter and the classification head (safetensors),
                           tuneforge_adapter.json (method, base model name, labels) and the tokenizer;
                           loaded on top of the base model named in config.yaml
      onnx/                optimized variants only: model.onnx (fp32 or int8) and the tokenizer
      variant.json         optimized variants only: which variant this is, how it was made, what it scored
      labels.json          label names in class-index order
      config.yaml          the resolved config that produced this run
      audit.json           the data audit (duplicates, conflicts, leakage, lengths)
      metrics.json         validation (and test) metrics of the kept model
      train_log.jsonl      one JSON object per logged step and evaluation
      confusion_matrix.png
      checkpoints/last/    resume state (weights, optimizer, RNG, position); removed after success
      checkpoints/teacher_logits.safetensors
                           distillation only: the teacher's logits on the training texts, for a
                           resumed run; removed after success

Training writes the run into RUN_DIR.partial beside it (checkpoints included) and renames it to RUN_DIR
only once it has finished, so RUN_DIR is always either a complete run or untouched; an interrupted run
stays in RUN_DIR.partial, where ``train --resume`` continues it. ``--overwrite`` replaces only a missing
path, an empty folder or a run directory (``check_replaceable``).

Later stages read a run through this module only, never through training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, load_saved_config
from tuneforge.errors import ConfigError, RunDirError

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
ADAPTER_MANIFEST = "tuneforge_adapter.json"
ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
VARIANT_FILE = "variant.json"
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.yaml"
AUDIT_FILE = "audit.json"
METRICS_FILE = "metrics.json"
TRAIN_LOG_FILE = "train_log.jsonl"
CONFUSION_PNG = "confusion_matrix.png"
CALIBRATION_FILE = "calibration.json"
CALIBRATION_PNG = "calibration.png"
CHECKPOINT_DIR = "checkpoints/last"
TEACHER_LOGITS_FILE = "checkpoints/teacher_logits.safetensors"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def onnx_file(self) -> Path:
        return self.path / ONNX_DIR / ONNX_FILE

    @property
    def variant_file(self) -> Path:
        return self.path / VARIANT_FILE

    @property
    def has_onnx(self) -> bool:
        return self.onnx_file.is_file()

    def variant(self) -> dict:
        """The optimized-variant description, or {} for a run straight from training."""
        if not self.variant_file.is_file():
            return {}
        try:
            info = json.loads(self.variant_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{self.variant_file}: invalid JSON ({exc.msg})") from None
        if not isinstance(info, dict):
            raise RunDirError(f"{self.variant_file}: expected a JSON object")
        return info

    @property
    def has_full_model(self) -> bool:
        return (self.model_dir / "config.json").is_file()

    @property
    def has_adapter(self) -> bool:
        return (self.adapter_dir / ADAPTER_MANIFEST).is_file()

    @property
    def labels_file(self) -> Path:
        return self.path / LABELS_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def config(self) -> RunConfig:
        """The validated config that produced this run, its relative paths resolved against the run folder."""
        config = self.config_or_none()
        if config is None:
            raise RunDirError(f"{self.path}: no {CONFIG_FILE}, so the run's model and data settings are unknown")
        return config

    def config_or_none(self) -> RunConfig | None:
        """Like :meth:`config`, but None where the run has no config (a model folder assembled by hand)."""
        if not self.config_file.exists():
            return None
        try:
            return load_saved_config(self.config_file)
        except ConfigError as exc:
            raise RunDirError(str(exc)) from None

    @property
    def audit_file(self) -> Path:
        return self.path / AUDIT_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def train_log_file(self) -> Path:
        return self.path / TRAIN_LOG_FILE

    @property
    def confusion_png(self) -> Path:
        return self.path / CONFUSION_PNG

    @property
    def calibration_file(self) -> Path:
        return self.path / CALIBRATION_FILE

    @property
    def calibration_png(self) -> Path:
        return self.path / CALIBRATION_PNG

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def teacher_logits_file(self) -> Path:
        return self.path / TEACHER_LOGITS_FILE

    def labels(self) -> list[str]:
        try:
            labels = json.loads(self.labels_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{self.path}: not a run directory (no {LABELS_FILE})") from None
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{self.labels_file}: invalid JSON ({exc.msg})") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) < 2:
            raise RunDirError(f"{self.labels_file}: expected a JSON list of at least two label names")
        return labels


# What marks a folder as a tuneforge run: labels.json (every stage writes it first) and at least one of
# the files only a run has. A folder that merely happens to contain a config.yaml is not one.
_RUN_MARKERS = (CONFIG_FILE, VARIANT_FILE, MODEL_DIR, ADAPTER_DIR, ONNX_DIR, "checkpoints")


def is_run_dir(path: Path | str) -> bool:
    """True for a folder that tuneforge wrote as a run directory (finished, interrupted or optimized)."""
    path = Path(path)
    return (
        path.is_dir()
        and not path.is_symlink()
        and (path / LABELS_FILE).is_file()
        and any((path / marker).exists() for marker in _RUN_MARKERS)
    )


def check_replaceable(path: Path | str, *, option: str) -> None:
    """Refuse to replace anything but a missing path, an empty folder or a tuneforge run directory.

    ``--overwrite`` and ``demo --out`` replace their target whole; pointed by mistake at ``.``, a home
    folder or a data folder they must stop with a message, never delete it. ``option`` names the key
    or flag that chose the path, for the message.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise RunDirError(f"{option}: {path} exists and is not a folder; tuneforge replaces only its own run folders")
    if any(path.iterdir()) and not is_run_dir(path):
        raise RunDirError(
            f"{option}: {path} is not empty and is not a tuneforge run directory (no {LABELS_FILE}); "
            "refusing to replace it: choose a new or empty folder"
        )


def open_run_dir(path: Path | str) -> RunDir:
    """Open a finished run directory for reading, checking that the model is there."""
    run = RunDir(Path(path))
    if not run.path.is_dir():
        raise RunDirError(f"{run.path}: run directory not found")
    if not (run.has_full_model or run.has_adapter or run.has_onnx):
        raise RunDirError(
            f"{run.path}: no model in {MODEL_DIR}/, {ADAPTER_DIR}/ or {ONNX_DIR}/ (was training finished?)"
        )
    run.labels()
    return run


def read_versioned_json(path: Path, *, kind: str, version: int, hint: str) -> dict[str, Any]:
    """A JSON object that a stage wrote into a run with ``"format": version`` (a calibration, a detector).
    Unreadable, or not an object of that format, is a :class:`RunDirError` naming the file and then ``hint``:
    how to make the file again."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != version:
        raise RunDirError(f"{path}: not a {kind} file of format {version}; {hint}")
    return meta
