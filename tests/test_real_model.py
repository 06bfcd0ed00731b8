"""A few checks with the real packaged all-MiniLM-L6-v2 on a handful of the bundled demo messages."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from tuneforge.config import validate_config
from tuneforge.infer.predictor import Predictor
from tuneforge.train.loop import train

pytestmark = pytest.mark.slow


def test_real_model_learns_the_demo_intents_and_reloads(tmp_path: Path) -> None:
    demo = Path(str(files("tuneforge.demo") / "support_intents.csv"))
    config = validate_config(
        {
            "model": {"name": "minilm-l6", "max_length": 48},
            "data": {"train": str(demo), "max_train_rows": 150, "validation_size": 0.3},
            "train": {"epochs": 4, "eval_batch_size": 64},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    result = train(config, show_progress=False)
    validation = result.metrics["validation"]
    # Six intents: chance is ~17%; a few epochs on ~100 messages should get well past half.
    assert validation["accuracy"] > 60.0, validation

    model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert model.config.num_labels == 6 and model.config.num_hidden_layers == 6

    predictor = Predictor(result.run_dir)
    [prediction] = predictor.predict(["please cancel my order, I no longer need it"], top_k=3)
    assert prediction.label in predictor.labels
    assert [p for _, p in prediction.top_k] == sorted((p for _, p in prediction.top_k), reverse=True)
    assert 0.0 < prediction.probability <= 1.0
    assert sum(predictor.predict_proba(["hello"])[0]) == pytest.approx(1.0, abs=1e-5)
