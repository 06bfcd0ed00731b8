"""Load a run directory and classify texts. Never imports training code.

Probabilities are calibrated: the logits are divided by the run's temperature (``RUN/calibration.json``,
:mod:`tuneforge.infer.calibration`) before the softmax, whichever form the model is loaded in; a run
without the file answers with its raw softmax, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tuneforge.data.batching import encode_texts
from tuneforge.data.cleaning import clean_text
from tuneforge.errors import RunDirError
from tuneforge.infer.calibration import Calibration, load_calibration, scaled_probabilities
from tuneforge.infer.openset import OpenSetDetector, load_detector
from tuneforge.models.runs import load_run_backend
from tuneforge.rundir import RunDir, open_run_dir


@dataclass(frozen=True)
class Prediction:
    """One text's answer. With an out-of-scope detector in the run, also ``decision`` (in_scope,
    out_of_scope or ambiguous), the detector's ``score`` and the ``candidates`` a bot can offer:
    the best two intents when ambiguous, the nearest one when out of scope (``label`` is then the OOS label)."""

    label: str
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    decision: str | None = None
    score: float | None = None
    candidates: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "label": self.label,
            "probability": round(self.probability, 6),
            "top_k": [{"label": label, "probability": round(p, 6)} for label, p in self.top_k],
        }
        if self.decision is not None:
            out["decision"] = self.decision
            out["score"] = round(float(self.score or 0.0), 6)
            out["candidates"] = [{"label": label, "probability": round(p, 6)} for label, p in self.candidates]
        return out


def check_label_count(run: RunDir, labels: list[str], outputs: int) -> None:
    """A labels.json that does not match the model would mislabel every answer, or fail each one."""
    if outputs != len(labels):
        raise RunDirError(
            f"{run.labels_file}: {len(labels)} labels, but the model in {run.path} has {outputs} outputs; "
            "the labels file does not belong to this model"
        )


class Predictor:
    """Classify texts with a trained run: the same cleaning and truncation as in training.

    ``calibrated=False`` ignores the run's temperature: the raw softmax, for code whose thresholds were
    chosen on it. ``device``: cpu (default), cuda, or auto (the GPU when there is one); an ONNX model
    uses ONNX Runtime's CUDA provider (onnxruntime-gpu).
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        threads: int | None = None,
        batch_size: int = 64,
        form: str = "auto",
        spin: bool = True,
        open_set: bool = True,
        calibrated: bool = True,
        device: str = "cpu",
    ) -> None:
        self.run: RunDir = open_run_dir(run_dir)
        if threads:
            torch.set_num_threads(threads)
        self.labels = self.run.labels()
        self.classifier, self.tokenizer, self.form = load_run_backend(
            self.run, form=form, threads=threads, spin=spin, device=device
        )
        check_label_count(self.run, self.labels, self.classifier.num_labels)
        # A run without a config (a model folder assembled by hand) gets the config's defaults.
        config = self.run.config_or_none()
        self.max_length: int = config.model.max_length if config else 128
        self.lowercase: bool = config.data.lowercase if config else False
        self.chinese_script: str | None = config.data.chinese_script if config else None
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.calibration: Calibration | None = load_calibration(self.run.path) if calibrated else None
        self.temperature: float = self.calibration.temperature if self.calibration is not None else 1.0
        # ``open_set=False`` ignores a fitted detector: plain closed-set classification.
        self.detector: OpenSetDetector | None = load_detector(self.run.path, self.labels) if open_set else None
        if self.detector is not None and self.detector.needs_features and not self.classifier.has_features:
            raise RunDirError(
                f"{self.run.path}: its {self.detector.method} detector needs the model's features, which this "
                f"{self.form} model does not output (an ONNX export from before the intent engine); export "
                "the variant again with tuneforge optimize, or fit an msp or energy detector"
            )
        if self.detector is not None and self.detector.temperature is None:
            # Built in code, with no temperature of its own: its thresholds are on this run's probabilities.
            self.detector.temperature = self.temperature

    def _encode(self, texts: list[str]) -> list[list[int]]:
        cleaned = [clean_text(t, lowercase=self.lowercase, chinese_script=self.chinese_script) for t in texts]
        return encode_texts(self.tokenizer, cleaned, self.max_length)

    def logits(self, texts: list[str]) -> np.ndarray:
        """The model's raw logits (not divided by the temperature: what a calibration is fitted on)."""
        return self.classifier.logits(self._encode(texts), pad_id=self.pad_id, batch_size=self.batch_size)

    def logits_and_features(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The raw logits and the feature vectors the classifier head reads (what the detector scores)."""
        return self.classifier.logits_and_features(self._encode(texts), pad_id=self.pad_id, batch_size=self.batch_size)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of raw ``logits``: ``softmax(logits / temperature)``."""
        return scaled_probabilities(logits, self.temperature)

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        return self.probabilities(self.logits(texts)).tolist()

    def predict(self, texts: list[str], *, top_k: int = 1) -> list[Prediction]:
        if self.detector is not None:
            return self._predict_open_set(texts, self.detector, top_k)
        results = []
        for row in self.predict_proba(texts):
            ranked = sorted(zip(self.labels, row, strict=True), key=lambda item: item[1], reverse=True)
            best_label, best_p = ranked[0]
            results.append(Prediction(best_label, float(best_p), [(lab, float(p)) for lab, p in ranked[:top_k]]))
        return results

    def _predict_open_set(self, texts: list[str], detector: OpenSetDetector, top_k: int) -> list[Prediction]:
        encoded = self._encode(texts)
        if detector.needs_features:
            logits, features = self.classifier.logits_and_features(
                encoded, pad_id=self.pad_id, batch_size=self.batch_size
            )
        else:
            logits, features = self.classifier.logits(encoded, pad_id=self.pad_id, batch_size=self.batch_size), None
        results = []
        decisions = detector.decide(logits, features, temperature=self.temperature)
        for row, decided in zip(self.probabilities(logits), decisions, strict=True):
            order = np.argsort(-row)[:top_k]
            results.append(
                Prediction(
                    decided.label,
                    decided.probability,
                    [(self.labels[j], float(row[j])) for j in order],
                    decision=decided.decision,
                    score=decided.score,
                    candidates=decided.candidates,
                )
            )
        return results
