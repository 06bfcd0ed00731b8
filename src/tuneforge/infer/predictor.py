"""Load a run directory and classify texts. Never imports training code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.data.batching import encode_texts
from tuneforge.data.cleaning import clean_text
from tuneforge.errors import RunDirError
from tuneforge.models.loading import softmax
from tuneforge.models.runs import load_run_backend
from tuneforge.rundir import RunDir, open_run_dir


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "probability": round(self.probability, 6),
            "top_k": [{"label": label, "probability": round(p, 6)} for label, p in self.top_k],
        }


def check_label_count(run: RunDir, labels: list[str], outputs: int) -> None:
    """A labels.json that does not match the model would mislabel every answer, or fail each one."""
    if outputs != len(labels):
        raise RunDirError(
            f"{run.labels_file}: {len(labels)} labels, but the model in {run.path} has {outputs} outputs; "
            "the labels file does not belong to this model"
        )


class Predictor:
    """Classify texts with a trained run: the same cleaning and truncation as in training."""

    def __init__(
        self,
        run_dir: Path | str,
        *,
        threads: int | None = None,
        batch_size: int = 64,
        form: str = "auto",
        spin: bool = True,
    ) -> None:
        self.run: RunDir = open_run_dir(run_dir)
        if threads:
            torch.set_num_threads(threads)
        self.labels = self.run.labels()
        self.classifier, self.tokenizer, self.form = load_run_backend(self.run, form=form, threads=threads, spin=spin)
        check_label_count(self.run, self.labels, self.classifier.num_labels)
        # A run without a config (a model folder assembled by hand) gets the config's defaults.
        config = self.run.config_or_none()
        self.max_length: int = config.model.max_length if config else 128
        self.lowercase: bool = config.data.lowercase if config else False
        self.chinese_script: str | None = config.data.chinese_script if config else None
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id or 0

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        cleaned = [clean_text(t, lowercase=self.lowercase, chinese_script=self.chinese_script) for t in texts]
        ids = encode_texts(self.tokenizer, cleaned, self.max_length)
        logits = self.classifier.logits(ids, pad_id=self.pad_id, batch_size=self.batch_size)
        return softmax(logits).tolist()

    def predict(self, texts: list[str], *, top_k: int = 1) -> list[Prediction]:
        results = []
        for row in self.predict_proba(texts):
            ranked = sorted(zip(self.labels, row, strict=True), key=lambda item: item[1], reverse=True)
            best_label, best_p = ranked[0]
            results.append(Prediction(best_label, float(best_p), [(lab, float(p)) for lab, p in ranked[:top_k]]))
        return results
