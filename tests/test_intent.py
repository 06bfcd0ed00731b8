"""The intent engine (tuneforge.apps.intent + tuneforge.infer.openset) on the tiny model: fitting, saving
and loading, each decision, intents added from examples, the optimized variant, and bad input."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_rows, tiny_config, write_csv
from tuneforge.apps.intent import FitOptions, add_intent, evaluate_open_set, fit_detector, remove_intent
from tuneforge.errors import DataError, RunDirError
from tuneforge.infer.openset import (
    DETECTOR_FILE,
    INTENT_DIR,
    STATS_FILE,
    AddedIntent,
    OpenSetDetector,
    load_detector,
    save_detector,
)
from tuneforge.infer.predictor import Predictor

# The tiny model learns two of the invented classes; the third ("meh") plays an intent added later, and
# texts of words it never saw play the out-of-scope requests.
LABELS = ("happy", "sad")
NONSENSE = "qzx vbk wjy xqv zzk jjq vvx kqz wxy qqj"


def oos_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = NONSENSE.split()
    return [" ".join(rng.sample(pieces, rng.randint(2, 5))) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def intent_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained for this module on two classes (10 epochs, 160 texts): it separates them."""
    from tuneforge.config import validate_config
    from tuneforge.train.loop import train

    folder = tmp_path_factory.mktemp("intent-run")
    data = {"train": write_csv(folder / "train.csv", make_rows(160, seed=21, labels=LABELS))}
    raw = tiny_config(tiny_model_dir, data, folder / "run", epochs=10)
    return train(validate_config(raw), show_progress=False).run_dir


@pytest.fixture()
def run(intent_run: Path, tmp_path: Path) -> Path:
    """A private copy: the tests write detectors into it."""
    return Path(shutil.copytree(intent_run, tmp_path / "run"))


@pytest.fixture()
def held_out(tmp_path: Path) -> Path:
    rows = make_rows(40, seed=33, labels=LABELS) + [(text, "oos") for text in oos_texts(30, seed=34)]
    return write_csv(tmp_path / "held_out.csv", rows)


def test_fit_without_oos_examples_keeps_the_target_recall_and_saves_plain_files(run: Path) -> None:
    from tuneforge.config import load_saved_config
    from tuneforge.data import prepare_data

    detector = fit_detector(run, options=FitOptions(target_recall=0.9))
    assert detector.method == "mahalanobis"
    assert detector.info["threshold_rule"] == "90% in-scope recall"
    assert {p.name for p in (run / INTENT_DIR).iterdir()} == {DETECTOR_FILE, STATS_FILE}
    meta = json.loads((run / INTENT_DIR / DETECTOR_FILE).read_text(encoding="utf-8"))
    assert meta["labels"] == json.loads((run / "labels.json").read_text(encoding="utf-8"))
    assert set(meta["validation"]) == {"msp", "energy", "mahalanobis", "knn"}

    # Re-made validation split, scored by the Predictor that now loads the detector: >= 90% stay in scope.
    cfg = load_saved_config(run / "config.yaml")
    validation = prepare_data(cfg.data.model_copy(update={"test": None}), seed=cfg.train.seed).validation
    predictions = Predictor(run).predict(validation.texts)
    kept = sum(p.decision != "out_of_scope" for p in predictions) / len(predictions)
    assert kept >= 0.9
    assert kept == pytest.approx(meta["validation"]["mahalanobis"]["in_scope_recall"] / 100, abs=1e-4)


def test_fit_with_oos_examples_picks_the_best_method_and_rejects_them(run: Path, held_out: Path) -> None:
    detector = fit_detector(run, data=held_out)
    validation = detector.info["validation"]
    assert detector.info["chosen_by"] == "best AUROC on the OOS examples"
    assert validation[detector.method]["auroc"] == max(figures["auroc"] for figures in validation.values())
    assert validation[detector.method]["auroc"] >= 90.0, validation

    predictor = Predictor(run)
    predictions = predictor.predict(oos_texts(40, seed=99))
    rejected = [p for p in predictions if p.decision == "out_of_scope"]
    assert all(p.label == "oos" and len(p.candidates) == 1 for p in rejected)
    known = predictor.predict(texts_of("happy", 20, seed=98) + texts_of("sad", 20, seed=97))
    known_rejected = sum(p.decision == "out_of_scope" for p in known)
    # The tiny model's features saturate, so the separation is partial; it must still be clear.
    assert len(rejected) >= 24 and known_rejected <= 8, (len(rejected), known_rejected)


def test_evaluate_counts_oos_and_draws_the_histogram(run: Path, held_out: Path, tmp_path: Path) -> None:
    fit_detector(run, data=held_out)
    rows = make_rows(30, seed=44, labels=LABELS) + [(text, "oos") for text in oos_texts(20, seed=45)]
    test_file = write_csv(tmp_path / "test.csv", rows)
    metrics, path = evaluate_open_set(run, test_file)
    assert metrics["n"] == 50 and metrics["n_oos"] == 20
    for key in ("in_scope_accuracy", "oos_precision", "oos_recall", "oos_f1", "auroc", "fpr_at_95_in_scope_recall"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["open_set_accuracy"] > 60.0, metrics
    assert sum(metrics["decisions"].values()) == 50
    assert json.loads(path.read_text(encoding="utf-8"))["auroc"] == metrics["auroc"]
    assert Path(metrics["score_histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _toy_detector(**overrides: object) -> OpenSetDetector:
    """Three intents whose features sit at the corners of a 2-D square; identity covariance."""
    values: dict = {
        "method": "msp",
        "threshold": 0.6,
        "feature_threshold": -2.0,
        "ambiguity_margin": 0.1,
        "labels": ["a", "b", "c"],
        "oos_label": "oos",
        "means": np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=np.float32),
        "precision": np.eye(2),
    }
    return OpenSetDetector(**(values | overrides))


def test_each_decision() -> None:
    detector = _toy_detector(threshold=0.45)
    logits = np.array([[5.0, 0.0, 0.0], [2.0, 1.95, -3.0], [0.1, 0.0, 0.05]])  # msp 0.99, 0.51, 0.35
    clear, close, flat = detector.decide(logits, None)
    assert (clear.decision, clear.label) == ("in_scope", "a")
    assert (close.decision, close.label) == ("ambiguous", "a")
    assert [label for label, _ in close.candidates] == ["a", "b"]  # "did you mean a or b?"
    assert (flat.decision, flat.label) == ("out_of_scope", "oos")
    assert flat.candidates[0][0] == "a" and flat.score < detector.threshold


def test_an_added_intent_wins_where_its_prototype_is_nearest() -> None:
    detector = _toy_detector(
        method="mahalanobis",
        threshold=-2.0,
        means=np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]], dtype=np.float32),
        added=[AddedIntent("d", ["x"] * 5)],
    )
    logits = np.array([[3.0, 0.0, 0.0]] * 3)  # the classifier only knows a, b, c
    features = np.array([[3.9, 4.1], [0.1, 0.0], [20.0, 20.0]])
    near_d, near_a, far = detector.decide(logits, features)
    assert (near_d.decision, near_d.label) == ("in_scope", "d")
    assert (near_a.decision, near_a.label) == ("in_scope", "a")
    assert far.decision == "out_of_scope"
    with pytest.raises(RunDirError, match="needs the model's features"):
        detector.decide(logits, None)

    # Its own, looser threshold: a text 3 units from the prototype is in scope for it, not for the default.
    loose = replace(detector, added=[AddedIntent("d", ["x"] * 5, threshold=-10.0)])
    away = np.array([[4.0, 7.0]])
    assert detector.decide(logits[:1], away)[0].decision == "out_of_scope"
    assert (loose.decide(logits[:1], away)[0].decision, loose.decide(logits[:1], away)[0].label) == ("in_scope", "d")


def test_save_and_load_round_trip_and_refuse_what_does_not_fit(tmp_path: Path) -> None:
    detector = _toy_detector(added=[AddedIntent("d", ["one", "two", "three", "four", "five"])])
    detector.means = np.vstack([detector.means, [[4.0, 4.0]]]).astype(np.float32)
    save_detector(tmp_path, detector)
    loaded = load_detector(tmp_path, ["a", "b", "c"])
    assert loaded is not None
    assert (loaded.method, loaded.threshold, loaded.all_labels) == ("msp", 0.6, ["a", "b", "c", "d"])
    np.testing.assert_array_equal(loaded.means, detector.means)
    assert load_detector(tmp_path / "elsewhere") is None

    with pytest.raises(RunDirError, match="other labels"):
        load_detector(tmp_path, ["a", "b"])
    meta_path = tmp_path / INTENT_DIR / DETECTOR_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps(meta | {"method": "astrology"}), encoding="utf-8")
    with pytest.raises(RunDirError, match=r"damaged.*astrology"):
        load_detector(tmp_path)
    meta_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(RunDirError, match="unreadable"):
        load_detector(tmp_path)
    meta_path.write_text("[]", encoding="utf-8")
    with pytest.raises(RunDirError, match="not a detector file of format 1; fit it again with tuneforge intent fit"):
        load_detector(tmp_path)
    save_detector(tmp_path, detector)
    (tmp_path / INTENT_DIR / STATS_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(RunDirError, match=r"stats\.safetensors: unreadable"):
        load_detector(tmp_path)


def test_a_damaged_detector_stops_the_predictor_with_a_clear_error(run: Path) -> None:
    fit_detector(run)
    (run / INTENT_DIR / DETECTOR_FILE).write_text("[]", encoding="utf-8")
    with pytest.raises(RunDirError, match=r"detector\.json"):
        Predictor(run)
    assert Predictor(run, open_set=False).predict(["great film"])[0].decision is None


def texts_of(label: str, n: int, seed: int) -> list[str]:
    return [text for text, _ in make_rows(n, seed=seed, labels=(label,))]


def test_add_and_remove_an_intent_without_retraining(run: Path) -> None:
    fit_detector(run)
    new = texts_of("meh", 10, seed=8)
    before = Predictor(run).predict(new)
    assert not any(p.label == "meh" for p in before)

    add_intent(run, "meh", texts_of("meh", 10, seed=7))
    predictor = Predictor(run)
    assert predictor.detector is not None and predictor.detector.all_labels[-1] == "meh"
    own = predictor.detector.added[-1].threshold
    assert own is not None and own <= predictor.detector.feature_threshold
    after = predictor.predict(new)
    assert sum(p.label == "meh" for p in after) >= 6, [(p.label, p.decision) for p in after]
    known = predictor.predict([text for text, _ in make_rows(30, seed=5, labels=LABELS)])
    assert sum(p.label == "meh" for p in known) <= 3, [(p.label, p.decision) for p in known]

    # Refitting keeps the added intent; removing it brings the old answers back.
    fit_detector(run)
    assert [a.label for a in load_detector(run).added] == ["meh"]
    remove_intent(run, "meh")
    again = Predictor(run).predict(new)
    assert [(p.label, p.decision) for p in again] == [(p.label, p.decision) for p in before]


def test_bad_input_is_a_clear_error(run: Path, tmp_path: Path, held_out: Path) -> None:
    with pytest.raises(RunDirError, match="tuneforge intent fit first"):
        add_intent(run, "new", oos_texts(6, seed=1))
    no_oos = write_csv(tmp_path / "no_oos.csv", make_rows(30, seed=3, labels=LABELS))
    with pytest.raises(DataError, match="no text is labelled 'out_of_scope'"):
        fit_detector(run, data=no_oos, options=FitOptions(oos_label="out_of_scope"))
    with pytest.raises(DataError, match="trained with it as an intent"):
        fit_detector(run, data=held_out, options=FitOptions(oos_label="happy"))
    unknown = write_csv(tmp_path / "unknown.csv", [*make_rows(9, seed=3, labels=LABELS), ("what", "weather")])
    with pytest.raises(DataError, match="label 'weather'"):
        fit_detector(run, data=unknown)

    fit_detector(run)
    with pytest.raises(DataError, match="at least 5"):
        add_intent(run, "new", ["one", "two", "two", "three", "four"])  # four distinct
    with pytest.raises(DataError, match="already"):
        add_intent(run, "happy", oos_texts(6, seed=1))
    with pytest.raises(DataError, match="a trained intent"):
        remove_intent(run, "sad")
    with pytest.raises(DataError, match="not an added intent"):
        remove_intent(run, "never-added")


def test_the_cli_fits_adds_predicts_and_evaluates(run: Path, held_out: Path, tmp_path: Path, capsys) -> None:
    from tuneforge.cli import EXIT_BAD_INPUT, main

    assert main(["intent", "fit", str(run), "--data", str(held_out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] in ("msp", "energy", "mahalanobis", "knn") and shown["added"] == {}
    examples = tmp_path / "examples.txt"
    examples.write_text("\n".join(texts_of("meh", 8, seed=2)) + "\n", encoding="utf-8")
    assert main(["intent", "add", str(run), "--label", "meh", "--examples", str(examples)]) == 0
    assert main(["intent", "show", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == {"meh": 8}
    assert main(["predict", str(run), "great lovely film", oos_texts(1, seed=3)[0], "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["decision"] in ("in_scope", "ambiguous", "out_of_scope") for line in lines] == [True, True]
    assert lines[0]["label"] == "happy" and lines[0]["candidates"][0]["label"] == "happy"

    rows = make_rows(20, seed=8, labels=LABELS) + [(t, "oos") for t in oos_texts(10, seed=9)]
    test_file = write_csv(tmp_path / "t.csv", rows)
    assert main(["evaluate", str(run), "--data", str(test_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_oos"] == 10
    assert main(["intent", "remove", str(run), "--label", "nope"]) == EXIT_BAD_INPUT
    assert "error: intent 'nope'" in capsys.readouterr().err


def test_the_optimized_variant_gets_its_own_detector(run: Path, held_out: Path, tmp_path: Path) -> None:
    from tuneforge.cli import main

    fit_detector(run, data=held_out)
    add_intent(run, "meh", texts_of("meh", 10, seed=7))
    out = tmp_path / "optimized"
    # onnx-fp32: the refit on ONNX Runtime's features is what is tested; int8 on this tiny random model
    # moves its features enough that the agreement below depends on the CPU's int8 kernels (0.68 on one).
    assert main(["optimize", str(run), "--out", str(out), "--variants", "onnx-fp32", "--max-drop", "50"]) == 0
    variant = load_detector(out)
    source = load_detector(run)
    assert variant is not None and source is not None
    assert variant.method == source.method and [a.label for a in variant.added] == ["meh"]
    assert variant.info["fitted_on"]["form"] == "onnx"

    texts = [t for t, _ in make_rows(30, seed=12)] + oos_texts(10, seed=13)
    fp32 = Predictor(run).predict(texts)
    int8 = Predictor(out).predict(texts)
    agree = sum(a.label == b.label for a, b in zip(fp32, int8, strict=True)) / len(texts)
    assert agree >= 0.85, [(a.label, b.label) for a, b in zip(fp32, int8, strict=True)]


def test_an_onnx_export_without_features_is_refused_for_a_feature_detector(run: Path, tmp_path: Path) -> None:
    import onnx

    from tuneforge.cli import main

    out = tmp_path / "optimized"
    assert main(["optimize", str(run), "--out", str(out), "--variants", "onnx-fp32", "--max-drop", "50"]) == 0
    onnx_file = next((out / "onnx").glob("*.onnx"))
    graph = onnx.load(str(onnx_file))
    del graph.graph.output[1]  # as exported before the intent engine: logits only
    onnx.save(graph, str(onnx_file))
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    save_detector(out, _toy_detector(method="mahalanobis", labels=labels, means=np.zeros((2, 2), np.float32)))
    with pytest.raises(RunDirError, match="export the variant again"):
        Predictor(out)


def test_the_training_config_fits_the_detector(tiny_model_dir: Path, tmp_path: Path) -> None:
    import yaml

    from tuneforge.cli import EXIT_BAD_INPUT, main

    data = {"train": write_csv(tmp_path / "train.csv", make_rows(60, seed=3, labels=LABELS))}
    held = write_csv(tmp_path / "held.csv", [(t, "oos") for t in oos_texts(12, seed=4)])
    raw = tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2)
    raw["intent"] = {"fit": True, "data": "held.csv", "method": "msp"}  # relative: next to the config
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["train", str(config)]) == 0
    detector = load_detector(tmp_path / "run")
    assert detector is not None and detector.method == "msp"
    assert detector.info["fitted_on"]["held_out_oos_texts"] == 12
    assert detector.info["fitted_on"]["held_out"] == str(held.resolve())

    raw["intent"] = {"fit": True, "target_recall": 1.5}
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["train", str(config), "--overwrite"]) == EXIT_BAD_INPUT
