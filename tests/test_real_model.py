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

    # The intent engine on the same run: fitted with the demo's out-of-scope messages, it turns away
    # requests unlike every intent and keeps the ones it was trained for.
    from tuneforge.apps.intent import fit_detector

    out_of_scope = Path(str(files("tuneforge.demo") / "support_out_of_scope.csv"))
    detector = fit_detector(result.run_dir, data=out_of_scope)
    assert detector.info["validation"][detector.method]["auroc"] > 85.0, detector.info["validation"]
    unrelated = [
        "what's the best way to learn the guitar?",
        "will it rain in Madrid on Friday?",
        "tell me something funny",
        "how far is the moon from the earth?",
    ]
    in_scope = [
        "my parcel still hasn't come, where is it?",
        "please cancel my order, I no longer need it",
        "I can't log in to my account",
        "the vase was smashed when it arrived",
    ]
    answers = Predictor(result.run_dir).predict(unrelated + in_scope)
    scores = [float(p.score or 0.0) for p in answers]
    # On 105 training messages the rejection is not yet sharp; the ranking must already be right.
    assert max(scores[:4]) < min(scores[4:]), scores
    assert sum(p.decision == "out_of_scope" for p in answers[:4]) >= 2
    assert all(p.decision != "out_of_scope" for p in answers[4:]), [p.decision for p in answers[4:]]
