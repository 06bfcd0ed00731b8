"""Calibrated probabilities (tuneforge.infer.calibration): fitting the temperature, its figures, its file,
every loader applying it, training and optimize fitting it, and ``tuneforge calibrate``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_rows, tiny_config, write_csv
from tuneforge.errors import DataError, RunDirError
from tuneforge.infer.calibration import (
    MAX_TEMPERATURE,
    Calibration,
    calibration_metrics,
    fit_calibration,
    fit_temperature,
    load_calibration,
    save_calibration,
    scaled_probabilities,
)
from tuneforge.infer.openset import OpenSetDetector, load_detector, save_detector
from tuneforge.infer.predictor import Predictor
from tuneforge.models.loading import softmax
from tuneforge.rundir import CALIBRATION_FILE, CALIBRATION_PNG

PNG = b"\x89PNG\r\n\x1a\n"


def _calibrated_logits(n: int = 3000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction: each label is drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 2.0
    probabilities = softmax(logits)
    labels = np.array([rng.choice(classes, p=row) for row in probabilities])
    return logits, labels


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return calibration_metrics(scaled_probabilities(logits, temperature), labels)["nll"]


# --- fitting ------------------------------------------------------------------------------------------
def test_an_over_confident_model_gets_a_temperature_above_one_that_lowers_nll() -> None:
    logits, labels = _calibrated_logits()
    over_confident = logits * 3.0
    temperature = fit_temperature(over_confident, labels)
    assert 2.5 < temperature < 3.5  # undoes the factor 3 (up to the sampling noise of 3000 labels)
    assert _nll(over_confident, labels, temperature) < _nll(over_confident, labels, 1.0) - 0.1
    before = calibration_metrics(scaled_probabilities(over_confident, 1.0), labels)
    after = calibration_metrics(scaled_probabilities(over_confident, temperature), labels)
    assert after["ece"] < before["ece"] / 3 and after["brier"] < before["brier"]
    assert after["accuracy"] == before["accuracy"]


def test_an_under_confident_model_gets_a_temperature_below_one() -> None:
    logits, labels = _calibrated_logits(seed=1)
    temperature = fit_temperature(logits / 4.0, labels)
    assert 0.2 < temperature < 0.3
    assert _nll(logits / 4.0, labels, temperature) < _nll(logits / 4.0, labels, 1.0)


def test_the_temperature_never_changes_the_top_label() -> None:
    logits, labels = _calibrated_logits(n=500, seed=2)
    calibration = fit_calibration(logits * 2.0, labels, {"data": "synthetic"})
    scaled = scaled_probabilities(logits * 2.0, calibration.temperature)
    np.testing.assert_array_equal(scaled.argmax(axis=1), logits.argmax(axis=1))
    assert calibration.before["accuracy"] == calibration.after["accuracy"]
    assert calibration.fitted_on == {"data": "synthetic", "texts": 500}


def test_texts_all_classified_right_are_refused_and_one_mistake_gives_a_bounded_fit() -> None:
    logits = np.array([[-5.0, 5.0], [5.0, -5.0]] * 10)
    labels = np.array([1, 0] * 10)
    # Every text right: the NLL only falls as T -> 0, so no temperature is the fit's answer.
    with pytest.raises(DataError, match="classifies all 20 texts right"):
        fit_temperature(logits, labels)
    one_wrong = labels.copy()
    one_wrong[0] = 0
    temperature = fit_temperature(logits, one_wrong)
    # One confident mistake in 20: a finite fit, softer than the logits say.
    assert math.isfinite(temperature) and 1.0 < temperature < MAX_TEMPERATURE
    assert fit_temperature(-logits, labels) == MAX_TEMPERATURE  # always wrong: as flat as allowed


def test_bad_input_to_the_fit_is_refused() -> None:
    with pytest.raises(DataError, match="no labelled texts"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="same label"):
        fit_temperature(np.random.default_rng(0).normal(size=(6, 3)), np.ones(6, dtype=int))
    with pytest.raises(DataError, match="rows of logits"):
        fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2]))
    with pytest.raises(DataError, match="class indices"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(DataError, match="NaN"):
        fit_temperature(np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]))


# --- figures ------------------------------------------------------------------------------------------
def test_ece_brier_and_nll_on_a_hand_made_example() -> None:
    probabilities = np.array(
        [
            [0.9, 0.1],  # bin (0.8667, 0.9333]: right
            [0.9, 0.1],  # the same bin: wrong
            [0.6, 0.4],  # bin (0.5333, 0.6]: right
            [0.3, 0.7],  # bin (0.6667, 0.7333]: right
        ]
    )
    labels = np.array([0, 1, 0, 1])
    figures = calibration_metrics(probabilities, labels)
    # Confidence 0.9 against accuracy 0.5 for half the texts; 0.6 vs 1 and 0.7 vs 1 for a quarter each.
    expected_ece = 0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3
    assert figures["ece"] == pytest.approx(expected_ece, abs=1e-6)
    expected_brier = (0.02 + 1.62 + 0.32 + 0.18) / 4
    assert figures["brier"] == pytest.approx(expected_brier, abs=1e-6)
    expected_nll = -(math.log(0.9) + math.log(0.1) + math.log(0.6) + math.log(0.7)) / 4
    assert figures["nll"] == pytest.approx(expected_nll, abs=1e-6)
    assert figures["accuracy"] == 75.0 and figures["n"] == 4


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin() -> None:
    # 0.6 is exactly 9/15: in the bin (0.5333, 0.6] with the 0.58, not in (0.6, 0.6667] with the 0.62.
    probabilities = np.array([[0.6, 0.4], [0.58, 0.42], [0.62, 0.38]])
    labels = np.array([0, 0, 1])
    # The first bin: confidence 0.59, accuracy 1 (both right); the second: 0.62, accuracy 0.
    expected = (2 / 3) * 0.41 + (1 / 3) * 0.62
    assert calibration_metrics(probabilities, labels)["ece"] == pytest.approx(expected, abs=1e-6)


# --- the file -----------------------------------------------------------------------------------------
def test_the_file_round_trips_and_a_damaged_one_is_a_clear_error(tmp_path: Path) -> None:
    assert load_calibration(tmp_path) is None
    calibration = Calibration(1.7, {"data": "x", "texts": 3}, {"ece": 0.2}, {"ece": 0.05})
    save_calibration(tmp_path, calibration)
    assert load_calibration(tmp_path) == calibration
    path = tmp_path / CALIBRATION_FILE
    for bad, match in (
        ("{not json", "unreadable"),
        ("[]", "not a calibration file"),
        (json.dumps({"format": 1, "temperature": 0}), "finite number above 0"),
        (json.dumps({"format": 1, "temperature": -2.0}), "finite number above 0"),
        (json.dumps({"format": 1, "temperature": "hot"}), "finite number above 0"),
        (json.dumps({"format": 1}), "finite number above 0"),
        ('{"format": 1, "temperature": NaN}', "finite number above 0"),
        (json.dumps({"format": 1, "temperature": 1.0, "before": [1]}), "must be JSON objects"),
    ):
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(RunDirError, match=match) as caught:
            load_calibration(tmp_path)
        assert str(path) in str(caught.value) and "tuneforge calibrate" in str(caught.value)
    with pytest.raises(RunDirError, match="finite number above 0"):
        save_calibration(tmp_path, Calibration(float("inf")))


# --- training -----------------------------------------------------------------------------------------
def test_training_fits_writes_and_reports_the_calibration(trained_tiny_run: Path) -> None:
    saved = load_calibration(trained_tiny_run)
    assert saved is not None and saved.temperature > 0 and saved.fitted_on["data"] == "validation split"
    metrics = json.loads((trained_tiny_run / "metrics.json").read_text(encoding="utf-8"))
    section = metrics["calibration"]
    assert section["temperature"] == saved.temperature
    before, after = section["validation"]["before"], section["validation"]["after"]
    assert set(before) == {"ece", "brier", "nll", "accuracy", "n"}
    assert after["nll"] <= before["nll"] + 1e-9 and after["accuracy"] == before["accuracy"]
    assert after["accuracy"] == pytest.approx(metrics["validation"]["accuracy"], abs=0.01)
    assert before["n"] == metrics["validation"]["n"]
    assert (trained_tiny_run / CALIBRATION_PNG).read_bytes()[:8] == PNG


def test_a_test_split_gets_its_own_before_and_after(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    from tuneforge.config import validate_config
    from tuneforge.train.loop import train

    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=1)
    metrics = train(validate_config(raw), show_progress=False).metrics
    test = metrics["calibration"]["test"]
    assert test["before"]["n"] == metrics["test"]["n"] == 30
    assert (
        test["before"]["accuracy"] == test["after"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=0.01)
    )

    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "raw", epochs=1, calibrate=False)
    metrics = train(validate_config(raw), show_progress=False).metrics
    assert "calibration" not in metrics and not (tmp_path / "raw" / CALIBRATION_FILE).exists()
    assert Predictor(tmp_path / "raw").temperature == 1.0


# --- loading ------------------------------------------------------------------------------------------
@pytest.fixture()
def run(trained_tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy: the tests write into it."""
    return Path(shutil.copytree(trained_tiny_run, tmp_path / "run"))


TEXTS = [text for text, _ in make_rows(9, seed=5)]


def test_the_predictor_divides_the_logits_by_the_temperature(run: Path) -> None:
    save_calibration(run, Calibration(2.5))
    predictor = Predictor(run)
    assert predictor.temperature == 2.5
    logits = predictor.logits(TEXTS)
    probabilities = np.array(predictor.predict_proba(TEXTS))
    np.testing.assert_allclose(probabilities, softmax(logits / 2.5), rtol=1e-6)
    assert not np.allclose(probabilities, softmax(logits), atol=1e-3)
    best = predictor.predict(TEXTS, top_k=2)
    for row, prediction in zip(probabilities, best, strict=True):
        assert prediction.probability == pytest.approx(float(row.max()), rel=1e-6)
    # The raw softmax on request, for code whose thresholds were chosen on it.
    raw = Predictor(run, calibrated=False)
    assert raw.temperature == 1.0
    np.testing.assert_allclose(np.array(raw.predict_proba(TEXTS)), softmax(logits), rtol=1e-6)


def test_a_run_without_calibration_answers_exactly_as_before(run: Path) -> None:
    (run / CALIBRATION_FILE).unlink()
    predictor = Predictor(run)
    assert predictor.calibration is None and predictor.temperature == 1.0
    logits = predictor.classifier.logits(predictor._encode(TEXTS), pad_id=predictor.pad_id)
    np.testing.assert_array_equal(np.array(predictor.predict_proba(TEXTS)), softmax(logits).tolist())


def test_a_damaged_calibration_stops_the_predictor_with_a_clear_error(run: Path) -> None:
    (run / CALIBRATION_FILE).write_text(json.dumps({"format": 1, "temperature": 0.0}), encoding="utf-8")
    with pytest.raises(RunDirError, match=r"calibration\.json: the temperature must be a finite number above 0"):
        Predictor(run)


# --- out-of-scope detection ---------------------------------------------------------------------------
def _msp_detector(labels: list[str], hidden: int, threshold: float, temperature: float | None) -> OpenSetDetector:
    return OpenSetDetector(
        method="msp",
        threshold=threshold,
        feature_threshold=0.0,
        ambiguity_margin=0.0,
        labels=labels,
        oos_label="oos",
        means=np.zeros((len(labels), hidden), dtype=np.float32),
        precision=np.eye(hidden, dtype=np.float32),
        temperature=temperature,
    )


def test_the_oos_threshold_reads_the_probabilities_it_was_fitted_on(run: Path) -> None:
    save_calibration(run, Calibration(0.5))
    predictor = Predictor(run, open_set=False)
    logits, features = predictor.logits_and_features(TEXTS)
    calibrated_top = softmax(logits / 0.5).max(axis=1)
    threshold = float(np.median(calibrated_top))
    # Fitted at this run's temperature: decisions cut the calibrated probabilities at the threshold.
    save_detector(run, _msp_detector(predictor.labels, features.shape[1], threshold, 0.5))
    decided = Predictor(run).predict(TEXTS)
    assert [p.decision == "out_of_scope" for p in decided] == list(calibrated_top < threshold)
    # Recalibrated later: the probabilities shown follow the new temperature, the threshold still cuts
    # the probabilities it was fitted on.
    save_calibration(run, Calibration(3.0))
    again = Predictor(run)
    assert again.detector is not None and again.detector.temperature == 0.5
    decided = again.predict(TEXTS)
    assert [p.decision == "out_of_scope" for p in decided] == list(calibrated_top < threshold)
    kept = [i for i, p in enumerate(decided) if p.decision != "out_of_scope"]
    shown = softmax(logits / 3.0)
    for i in kept:
        assert decided[i].probability == pytest.approx(float(shown[i].max()), rel=1e-5)


def test_a_detector_file_from_before_calibration_reads_raw_logits(run: Path) -> None:
    predictor = Predictor(run, open_set=False)
    _, features = predictor.logits_and_features(TEXTS[:1])
    save_detector(run, _msp_detector(predictor.labels, features.shape[1], 0.5, None))
    meta_path = run / "intent" / "detector.json"
    assert json.loads(meta_path.read_text(encoding="utf-8"))["temperature"] is None
    # null (built in code): the loading Predictor gives it the run's temperature.
    assert Predictor(run).detector.temperature == predictor.temperature
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["temperature"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    assert load_detector(run).temperature == 1.0 and Predictor(run).detector.temperature == 1.0
    meta_path.write_text(json.dumps(meta | {"temperature": -1}), encoding="utf-8")
    with pytest.raises(RunDirError, match="temperature"):
        load_detector(run)


def test_intent_fit_fits_its_threshold_on_calibrated_probabilities(run: Path) -> None:
    from tuneforge.apps.intent import FitOptions, fit_detector

    save_calibration(run, Calibration(0.7))
    detector = fit_detector(run, options=FitOptions(method="msp", target_recall=0.5))
    assert detector.temperature == 0.7 and load_detector(run).temperature == 0.7
    predictor = Predictor(run)
    logits, _ = predictor.logits_and_features(TEXTS)
    top = softmax(logits / 0.7).max(axis=1)
    assert [p.decision == "out_of_scope" for p in predictor.predict(TEXTS)] == list(top < detector.threshold)


# --- tuneforge calibrate ------------------------------------------------------------------------------
def _labelled_file(tmp_path: Path, n: int = 30, seed: int = 7) -> Path:
    return write_csv(tmp_path / "held_out.csv", make_rows(n, seed=seed))


def test_the_cli_calibrates_a_run(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tuneforge.cli import main

    trained = load_calibration(run)
    data = _labelled_file(tmp_path)
    capsys.readouterr()
    assert main(["calibrate", str(run), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    saved = load_calibration(run)
    assert saved is not None and saved.fitted_on["texts"] == 30 and saved.fitted_on["data"] == str(data.resolve())
    assert f"temperature {saved.temperature:.4g} (was {trained.temperature:g})" in out
    for key in ("ECE", "Nll", "Brier"):
        assert key in out
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["calibration"]["temperature"] == saved.temperature
    assert metrics["calibration"]["data"]["after"]["nll"] <= metrics["calibration"]["data"]["before"]["nll"]
    assert "validation" in metrics  # the training's own metrics are kept
    assert (run / CALIBRATION_PNG).read_bytes()[:8] == PNG
    assert Predictor(run).temperature == saved.temperature

    assert main(["calibrate", str(run), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["temperature"] == saved.temperature


def test_calibrate_replaces_a_damaged_calibration(run: Path, tmp_path: Path) -> None:
    from tuneforge.apps.calibrate.fit import calibrate_file

    (run / CALIBRATION_FILE).write_text("{broken", encoding="utf-8")
    result = calibrate_file(run, _labelled_file(tmp_path))
    assert result.previous_temperature is None and "damaged" in result.notes[0]
    assert load_calibration(run) == result.calibration


def test_calibrate_refuses_bad_input(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tuneforge.cli import EXIT_BAD_INPUT, main

    before = (run / CALIBRATION_FILE).read_bytes()
    empty = write_csv(tmp_path / "empty.csv", [])
    unknown = write_csv(tmp_path / "unknown.csv", [("a fine film", "happy"), ("what a film", "thrilled")])
    one_label = write_csv(tmp_path / "one.csv", [(f"great film {i}", "happy") for i in range(5)])
    for data, message in ((empty, "empty.csv"), (unknown, "thrilled"), (one_label, "same label")):
        capsys.readouterr()
        assert main(["calibrate", str(run), "--data", str(data)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert main(["calibrate", str(tmp_path / "nowhere"), "--data", str(one_label)]) == EXIT_BAD_INPUT
    assert "run directory not found" in capsys.readouterr().err
    assert (run / CALIBRATION_FILE).read_bytes() == before  # nothing written


# --- optimize: each variant fits its own --------------------------------------------------------------
def test_each_optimized_variant_fits_its_own_temperature_and_calibrate_fits_an_onnx_one(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tuneforge.cli import main
    from tuneforge.optimize.pipeline import OptimizeOptions, optimize_run

    out = tmp_path / "opt"
    result = optimize_run(trained_tiny_run, out_dir=out, options=OptimizeOptions(variants=("onnx-fp32",), threads=1))
    for name in ("torch-fp32", "onnx-fp32"):
        folder = out / "variants" / name
        saved = load_calibration(folder)
        assert saved is not None and saved.fitted_on["variant"] == name
        info = json.loads((folder / "variant.json").read_text(encoding="utf-8"))
        assert info["calibration"]["temperature"] == saved.temperature
        assert (folder / CALIBRATION_PNG).read_bytes()[:8] == PNG
    # The same model, exported: (nearly) the same logits, so (nearly) the same temperature.
    torch_t = load_calibration(out / "variants" / "torch-fp32").temperature
    onnx_t = load_calibration(out / "variants" / "onnx-fp32").temperature
    assert onnx_t == pytest.approx(torch_t, rel=1e-3)
    chosen = load_calibration(out)
    assert chosen == load_calibration(out / "variants" / result.chosen)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["calibration"]["temperature"] == chosen.temperature

    variant = out / "variants" / "onnx-fp32"
    capsys.readouterr()
    assert main(["calibrate", str(variant), "--data", str(_labelled_file(tmp_path))]) == 0
    saved = load_calibration(variant)
    assert saved.fitted_on["form"] == "onnx" and saved.fitted_on["variant"] == "onnx-fp32"
    predictor = Predictor(variant)
    assert predictor.form == "onnx" and predictor.temperature == saved.temperature
    logits = predictor.logits(TEXTS)
    np.testing.assert_allclose(np.array(predictor.predict_proba(TEXTS)), softmax(logits / saved.temperature), rtol=1e-5)


def test_evaluate_reports_the_calibration(run: Path, tmp_path: Path) -> None:
    from tuneforge.infer.evaluate import evaluate_file

    metrics, _ = evaluate_file(run, _labelled_file(tmp_path))
    saved = load_calibration(run)
    assert metrics["calibration"]["temperature"] == saved.temperature
    assert 0.0 <= metrics["calibration"]["ece"] <= 1.0 and metrics["calibration"]["nll"] > 0
