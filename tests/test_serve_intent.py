"""Serving a run with an out-of-scope detector (RUN/intent/): decisions over HTTP, the schema, /v1/model,
batching, a damaged detector, and the playground showing out-of-scope and ambiguous answers.

The detector is built by hand on a copy of the tiny trained run: an msp detector whose threshold and
ambiguity margin are derived from the model's own probabilities on a few texts, so that some texts are
in scope, some out of scope and one ambiguous.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import make_rows
from tests.test_serve import LABELS, UvicornThread, _with_app, settings_for, wait_ready
from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.infer.openset import AddedIntent, OpenSetDetector, detector_dir, save_detector
from tuneforge.infer.predictor import Predictor
from tuneforge.serve.app import create_app
from tuneforge.serve.model import OpenSetAnswers, run_version

torch.set_num_threads(1)

OOS = "oos"
ARTIFACTS = Path(__file__).parent / "artifacts"
# The tiny model's probabilities lie close together (it is barely trained); a threshold is put in the
# widest gap between two of them, and that gap must be far wider than the float noise between two forward
# passes of the same text in different batches (about 1e-7), so that no text can cross it.
SEPARATION = 1e-6


@dataclass(frozen=True)
class IntentRun:
    path: Path
    texts: list[str]
    probabilities: np.ndarray  # the model's own, texts x labels
    hidden: int
    detector: OpenSetDetector
    expected: list[str]  # the decision each text must get

    def of(self, kind: str) -> list[int]:
        return [i for i, decision in enumerate(self.expected) if decision == kind]


def _widest_gap(values: np.ndarray, low: int, high: int) -> tuple[float, int]:
    """A value in the widest gap between sorted ``values[k - 1]`` and ``values[k]`` for ``low <= k < high``,
    and that ``k``: the number of values below it."""
    ordered = np.sort(values)
    k = low + int(np.argmax(np.diff(ordered)[low - 1 : high - 1]))
    assert ordered[k] - ordered[k - 1] > SEPARATION, f"the tiny model's values are all alike: {ordered}"
    return float(ordered[k - 1] + ordered[k]) / 2, k


def _expected(probabilities: np.ndarray, threshold: float, margin: float) -> list[str]:
    top_two = -np.sort(-probabilities, axis=1)[:, :2]
    return ["out_of_scope" if p1 < threshold else "ambiguous" if p1 - p2 < margin else "in_scope" for p1, p2 in top_two]


def build_intent_run(source: Path, target: Path) -> IntentRun:
    shutil.copytree(source, target)  # the session's run is shared: never write into it
    texts = [text for text, _ in make_rows(24, seed=21)]
    predictor = Predictor(target, open_set=False)
    probabilities = np.asarray(predictor.predict_proba(texts))
    _, features = predictor.logits_and_features(texts[:2])
    hidden = int(features.shape[1])
    top = probabilities.max(axis=1)
    # About half of the texts out of scope.
    threshold, _ = _widest_gap(top, len(top) // 4, 3 * len(top) // 4 + 1)
    # Among the texts in scope, those whose best two intents are closest become ambiguous (a few, at least
    # one), the others stay plainly in scope.
    ordered = -np.sort(-probabilities, axis=1)
    kept = top >= threshold
    gaps = ordered[kept, 0] - ordered[kept, 1]
    assert len(gaps) >= 2, "too few texts in scope to make one ambiguous"
    margin, _ = _widest_gap(gaps, 1, max(2, len(gaps) // 2 + 1))
    detector = OpenSetDetector(
        method="msp",
        threshold=threshold,
        feature_threshold=0.0,
        ambiguity_margin=margin,
        labels=list(predictor.labels),
        oos_label=OOS,
        # msp reads neither, but the files always hold statistics of the right shapes.
        means=np.zeros((len(predictor.labels), hidden), dtype=np.float32),
        precision=np.eye(hidden, dtype=np.float32),
    )
    save_detector(target, detector)
    expected = _expected(probabilities, threshold, margin)
    assert {"in_scope", "out_of_scope", "ambiguous"} <= set(expected), expected
    return IntentRun(target, texts, probabilities, hidden, detector, expected)


@pytest.fixture(scope="module")
def intent_run(trained_tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> IntentRun:
    return build_intent_run(trained_tiny_run, tmp_path_factory.mktemp("intent") / "run")


@pytest.fixture(scope="module")
def intent_client(intent_run: IntentRun) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(intent_run.path, max_texts_per_request=32, max_wait_ms=2))) as client:
        wait_ready(client)
        yield client


def _ranked(row: np.ndarray) -> list[tuple[str, float]]:
    order = np.argsort(-row, kind="stable")
    return [(LABELS[j], float(row[j])) for j in order]


# --- decisions over HTTP ---------------------------------------------------------------------------------


def test_each_decision_comes_back_with_its_label_and_candidates(
    intent_client: TestClient, intent_run: IntentRun
) -> None:
    response = intent_client.post("/v1/classify", json={"texts": intent_run.texts, "top_k": 3})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["decision"] for p in predictions] == intent_run.expected
    for prediction, row in zip(predictions, intent_run.probabilities, strict=True):
        ranked = _ranked(row)
        assert prediction["score"] == pytest.approx(ranked[0][1], abs=1e-4), "msp scores the top probability"
        assert [item["label"] for item in prediction["top_k"]] == [label for label, _ in ranked]
        candidates = [(item["label"], item["probability"]) for item in prediction["candidates"]]
        if prediction["decision"] == "out_of_scope":
            assert prediction["label"] == OOS
            assert [label for label, _ in candidates] == [ranked[0][0]], "the nearest intent only"
        else:
            assert prediction["label"] == ranked[0][0]
            assert [label for label, _ in candidates] == [ranked[0][0], ranked[1][0]]
        for (_, got), (_, want) in zip(candidates, ranked, strict=False):
            assert got == pytest.approx(want, abs=1e-4)
        assert prediction["probability"] == pytest.approx(ranked[0][1], abs=1e-4)


def test_one_text_of_each_kind_alone_gets_the_same_decision(intent_client: TestClient, intent_run: IntentRun) -> None:
    for kind in ("in_scope", "out_of_scope", "ambiguous"):
        i = intent_run.of(kind)[0]
        [prediction] = intent_client.post("/v1/classify", json={"text": intent_run.texts[i]}).json()["predictions"]
        assert prediction["decision"] == kind
        assert len(prediction["top_k"]) == 1, "top_k follows the request, not the detector"
        assert len(prediction["candidates"]) == (1 if kind == "out_of_scope" else 2)


def test_concurrent_requests_batched_together_keep_their_own_decisions(intent_run: IntentRun) -> None:
    batches: list[int] = []

    class Counting(Predictor):
        def predict(self, texts: list[str], *, top_k: int = 1) -> Any:
            batches.append(len(texts))
            return super().predict(texts, top_k=top_k)

    def factory(settings: Any) -> Counting:
        return Counting(settings.run_dir, threads=1, spin=False)

    app = create_app(settings_for(intent_run.path, max_batch_size=8, max_wait_ms=50), model_factory=factory)
    groups = [list(range(i, min(i + 3, len(intent_run.texts)))) for i in range(0, len(intent_run.texts), 3)]

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        payloads = [
            {"texts": [intent_run.texts[i] for i in group], "top_k": 1 + n % 3} for n, group in enumerate(groups)
        ]
        return await asyncio.gather(*(client.post("/v1/classify", json=p) for p in payloads))

    responses = asyncio.run(_with_app(app, body))
    assert len(batches[1:]) < len(groups), f"requests were not batched together: {batches}"
    for n, (group, response) in enumerate(zip(groups, responses, strict=True)):
        predictions = response.json()["predictions"]
        assert [p["decision"] for p in predictions] == [intent_run.expected[i] for i in group]
        assert all(len(p["top_k"]) == 1 + n % 3 for p in predictions)


def test_answers_are_sliced_by_request_like_an_array(intent_run: IntentRun) -> None:
    predictor = Predictor(intent_run.path)
    predictions = predictor.predict(intent_run.texts[:5], top_k=3)
    answers = OpenSetAnswers(np.arange(15, dtype=np.float32).reshape(5, 3), predictions)
    part = answers[1:3]
    assert len(part) == 2 and part.predictions == predictions[1:3]
    assert part.probabilities.tolist() == [[3, 4, 5], [6, 7, 8]]


def test_an_added_intent_is_answered_by_its_own_label(trained_tiny_run: Path, tmp_path: Path) -> None:
    # An intent added from examples is a class mean in feature space: the text it was made from is nearest
    # to it, so it gets the added label, which the model's own labels do not have.
    run = tmp_path / "run"
    shutil.copytree(trained_tiny_run, run)
    predictor = Predictor(run, open_set=False)
    texts = ["plain ordinary story", "lovely film", "awful plot"]
    _, features = predictor.logits_and_features(texts)
    far = features.mean(axis=0) + 100.0  # trained means far from every text, so only the added one is near
    detector = OpenSetDetector(
        method="mahalanobis",
        threshold=-1e12,
        feature_threshold=-1e12,
        ambiguity_margin=0.0,
        labels=list(predictor.labels),
        oos_label=OOS,
        means=np.vstack([np.tile(far, (len(LABELS), 1)), features[:1]]).astype(np.float32),
        precision=np.eye(features.shape[1], dtype=np.float32),
        added=[AddedIntent("refund", [texts[0]])],
    )
    save_detector(run, detector)
    with TestClient(create_app(settings_for(run))) as client:
        wait_ready(client)
        [prediction] = client.post("/v1/classify", json={"text": texts[0], "top_k": 3}).json()["predictions"]
        info = client.get("/v1/model").json()
    assert prediction["decision"] == "in_scope" and prediction["label"] == "refund"
    assert prediction["candidates"][0]["label"] == "refund"
    assert sorted(item["label"] for item in prediction["top_k"]) == LABELS, "top_k ranks the trained labels"
    assert info["detector"]["method"] == "mahalanobis" and info["detector"]["added_intents"] == ["refund"]


# --- without a detector, as before -----------------------------------------------------------------------


def test_a_run_without_a_detector_answers_as_before(trained_tiny_run: Path, intent_run: IntentRun) -> None:
    with TestClient(create_app(settings_for(trained_tiny_run))) as client:
        wait_ready(client)
        body = client.post("/v1/classify", json={"texts": intent_run.texts[:4], "top_k": 2}).json()
        info = client.get("/v1/model").json()
    for prediction, row in zip(body["predictions"], intent_run.probabilities, strict=False):
        assert set(prediction) == {"label", "probability", "top_k", "truncated"}, "no decision keys, not even null"
        assert prediction["label"] == _ranked(row)[0][0]
    assert info["detector"] is None


def test_the_detector_does_not_change_the_probabilities(intent_client: TestClient, intent_run: IntentRun) -> None:
    body = intent_client.post("/v1/classify", json={"texts": intent_run.texts, "top_k": 3}).json()
    got = np.array(
        [[item["probability"] for item in sorted(p["top_k"], key=lambda x: x["label"])] for p in body["predictions"]]
    )
    assert np.allclose(got, intent_run.probabilities, atol=1e-4), "the detector does not change probabilities"


# --- the model's description and version ----------------------------------------------------------------


def test_model_info_reports_the_detector(intent_client: TestClient, intent_run: IntentRun) -> None:
    info = intent_client.get("/v1/model").json()
    assert info["detector"] == {
        "method": "msp",
        "oos_label": OOS,
        "threshold": pytest.approx(intent_run.detector.threshold),
        "ambiguity_margin": pytest.approx(intent_run.detector.ambiguity_margin),
        "added_intents": [],
    }
    assert info["labels"] == LABELS


def test_refitting_the_detector_changes_the_model_version(
    intent_run: IntentRun, trained_tiny_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(intent_run.path, run)
    before = run_version(run)
    save_detector(run, replace(intent_run.detector, threshold=intent_run.detector.threshold / 2))
    refitted = run_version(run)
    assert refitted != before
    shutil.rmtree(detector_dir(run))
    assert run_version(run) == run_version(trained_tiny_run), "without a detector, the version it always had"


# --- the published schema --------------------------------------------------------------------------------


def test_the_schema_documents_the_decision_fields(intent_client: TestClient) -> None:
    schemas = intent_client.get("/openapi.json").json()["components"]["schemas"]
    result = schemas["ClassifyResult"]
    for name in ("decision", "score", "candidates"):
        prop = result["properties"][name]
        assert "out-of-scope detector" in prop["description"]
        assert "anyOf" not in prop and prop.get("type") != "null", "absent without a detector, never null"
        assert name not in result.get("required", [])
    assert result["properties"]["decision"]["enum"] == ["in_scope", "out_of_scope", "ambiguous"]
    assert result["properties"]["score"]["type"] == "number"
    assert result["properties"]["candidates"]["items"] == {"$ref": "#/components/schemas/LabelScore"}
    assert {"label", "probability", "top_k", "truncated"} <= set(result["required"])
    detector = schemas["ModelInfo"]["properties"]["detector"]
    assert "null when it has none" in detector["description"]
    assert {"method", "oos_label", "added_intents"} <= set(schemas["DetectorInfo"]["properties"])


# --- a damaged detector ----------------------------------------------------------------------------------


@pytest.fixture()
def damaged_run(intent_run: IntentRun, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(intent_run.path, run)
    (detector_dir(run) / "detector.json").write_text('{"format": 1, "method": "msp", "thresh', encoding="utf-8")
    return run


def test_a_damaged_detector_stops_the_cli_with_one_line(damaged_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["serve", str(damaged_run), "--port", "0"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "detector.json: unreadable" in err[0] and "tuneforge intent fit" in err[0]


def test_a_detector_for_other_labels_stops_the_cli(
    intent_run: IntentRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(intent_run.path, run)
    meta_path = detector_dir(run) / "detector.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["labels"] = ["yes", "no", "maybe"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    capsys.readouterr()
    assert main(["serve", str(run), "--port", "0"]) == EXIT_BAD_INPUT
    assert "fitted for other labels than this run's model" in capsys.readouterr().err


def test_a_damaged_detector_fails_the_load_and_is_reported(damaged_run: Path) -> None:
    # Our own handler: the serve logger may not propagate to pytest's (the CLI's logging set-up stops it).
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tuneforge.serve")
    logger.addHandler(handler)
    try:
        with TestClient(create_app(settings_for(damaged_run))) as client:
            deadline = time.monotonic() + 30
            while client.get("/ready").json()["status"] == "loading":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert client.get("/ready").json() == {"status": "failed"}
            response = client.post("/v1/classify", json={"text": "lovely"})
            assert response.status_code == 503
            assert response.json()["detail"] == "the model failed to load; see the server log"
    finally:
        logger.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert any("detector.json: unreadable" in m for m in messages), f"served closed-set instead? {messages}"


# --- the playground --------------------------------------------------------------------------------------


def test_the_playground_marks_out_of_scope_and_ambiguous_answers(browser: Any, intent_run: IntentRun) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    oos, ambiguous, in_scope = (intent_run.of(kind)[0] for kind in ("out_of_scope", "ambiguous", "in_scope"))
    texts = [intent_run.texts[i] for i in (oos, ambiguous, in_scope)]
    with UvicornThread(create_app(settings_for(intent_run.path, max_wait_ms=1))) as server:
        server.wait_ready()
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: "Out-of-scope detection: msp" in b.find_element(By.ID, "status").text)
        browser.find_element(By.ID, "per-line").click()
        browser.find_element(By.ID, "text").send_keys("\n".join(texts))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .prediction")) == 3)
        blocks = browser.find_elements(By.CSS_SELECTOR, "#results .prediction")
        assert [b.get_attribute("data-decision") for b in blocks] == ["out_of_scope", "ambiguous", "in_scope"]

        nearest = _ranked(intent_run.probabilities[oos])[0][0]
        assert blocks[0].find_element(By.CSS_SELECTOR, ".top").text == OOS
        verdict = blocks[0].find_element(By.CSS_SELECTOR, ".verdict").text
        assert "I don't know" in verdict and f"nearest: \u201c{nearest}\u201d" in verdict

        first, second = (label for label, _ in _ranked(intent_run.probabilities[ambiguous])[:2])
        verdict = blocks[1].find_element(By.CSS_SELECTOR, ".verdict").text
        assert f"Did you mean \u201c{first}\u201d" in verdict and f"or \u201c{second}\u201d" in verdict

        # Visibly different: each kind has its own colour of rule beside it.
        colours = [b.value_of_css_property("border-left-color") for b in blocks]
        assert len(set(colours)) == 3, colours
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground-intent.png"))
