"""POST /v1/explain: the answer, its limits, auth, bad input, and that explanations cannot starve classification."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.test_explain import train_learned_run
from tests.test_serve import KEY, LABELS, FakeModel, _with_app, fake_client, settings_for, wait_ready
from tuneforge.explain import MAX_WORDS, explain
from tuneforge.infer.predictor import Predictor
from tuneforge.serve.app import create_app
from tuneforge.serve.explainer import EXPLAIN_CHUNK, EXPLAIN_IN_FLIGHT, EXPLAIN_WAITING, ExplainLane
from tuneforge.serve.model import OpenSetAnswers

torch.set_num_threads(1)


class RecordingModel(FakeModel):
    """The test server's fake, also keeping each model call's texts (to see what shared a batch)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[list[str]] = []

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        rows = super().predict_proba(texts)
        if texts != ["warm up"]:
            self.calls.append(list(texts))
        return rows


@pytest.fixture(scope="module")
def learned_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_learned_run(tiny_model_dir, tmp_path_factory.mktemp("learned-run"))


@pytest.fixture(scope="module")
def client(learned_run: Path) -> Iterator[TestClient]:
    app = create_app(settings_for(learned_run, max_chars=400, max_wait_ms=1))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


# --- the answer ------------------------------------------------------------------------------------


def test_explain_scores_each_word_as_the_library_does(client: TestClient, learned_run: Path) -> None:
    text = "the acting was SUPERB!"
    response = client.post("/v1/explain", json={"text": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"request_id", "label", "probability", "method", "words", "model_version", "latency_ms"}
    assert body["method"] == "occlusion" and body["label"] == "happy"
    assert [w["word"] for w in body["words"]] == ["the", "acting", "was", "SUPERB!"]
    assert [text[w["start"] : w["end"]] for w in body["words"]] == ["the", "acting", "was", "SUPERB!"]
    local = explain(Predictor(learned_run, threads=1, open_set=False), text)
    assert [w["score"] for w in body["words"]] == pytest.approx(local.scores, abs=1e-4)
    assert max(body["words"], key=lambda w: w["score"])["word"] == "SUPERB!"
    # The probability is the classification's.
    classified = client.post("/v1/classify", json={"text": text}).json()["predictions"][0]
    assert body["probability"] == pytest.approx(classified["probability"], abs=1e-4)
    assert body["model_version"] == client.get("/v1/model").json()["version"]


def test_explain_another_label(client: TestClient) -> None:
    body = client.post("/v1/explain", json={"text": "the acting was superb", "label": "sad"}).json()
    assert body["label"] == "sad" and body["probability"] < 0.5
    superb = body["words"][-1]
    assert superb["word"] == "superb" and superb["score"] < 0  # it argues against "sad"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"text": ""}, "'text'"),
        ({"text": "   \n "}, "empty text"),
        ({"text": "x" * 401}, "'text' has 401 characters; the limit is 400 per text"),
        ({"text": "a " * (MAX_WORDS + 1)}, f"'text': the text has {MAX_WORDS + 1} words; the limit is {MAX_WORDS}"),
        ({"text": "lovely", "label": "joyful"}, "'label': unknown label 'joyful'; the model's labels are 'happy'"),
        ({"text": "lovely", "label": None}, "null is not allowed"),
        ({"text": "lovely", "method": "integrated_gradients"}, "'method'"),
        ({"texts": ["lovely"]}, "'text'"),
        ({"text": 5}, "'text'"),
    ],
)
def test_bad_requests_are_422_with_a_clear_message(client: TestClient, payload: Any, fragment: str) -> None:
    response = client.post("/v1/explain", json=payload)
    assert response.status_code == 422, response.text
    messages = " ".join(item["msg"] for item in response.json()["detail"])
    assert fragment in messages, messages
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_a_body_over_the_size_limit_is_413() -> None:
    with fake_client(max_chars=20, max_texts_per_request=1) as client:
        wait_ready(client)
        response = client.post("/v1/explain", json={"text": "lovely " * 20_000})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]


def test_explain_needs_the_api_key() -> None:
    with fake_client(api_key=KEY) as client:
        wait_ready(client)
        assert client.post("/v1/explain", json={"text": "lovely film"}).status_code == 401
        answered = client.post("/v1/explain", json={"text": "lovely film"}, headers={"X-API-Key": KEY})
        assert answered.status_code == 200 and answered.json()["label"] in LABELS


def test_explain_is_503_until_the_model_is_ready() -> None:
    gate = threading.Event()
    with fake_client(FakeModel(gate=gate)) as client:  # the warm-up blocks: the model never gets ready
        response = client.post("/v1/explain", json={"text": "lovely film"})
        gate.set()
    assert response.status_code == 503 and "loading" in response.json()["detail"]


def test_the_lane_reads_the_probabilities_of_a_model_with_a_detector() -> None:
    from tuneforge.serve.explainer import _probabilities_of

    rows = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    assert np.allclose(_probabilities_of(OpenSetAnswers(rows, [])), rows)
    assert np.allclose(_probabilities_of(rows), rows)


# --- bounded: explanations never starve classification ---------------------------------------------


def test_an_explanation_goes_in_chunks_and_classification_passes_between_them() -> None:
    model = RecordingModel(delay=0.02)
    app = create_app(settings_for(max_batch_size=32, max_wait_ms=0), model_factory=lambda _s: model)
    text = " ".join(f"w{i}" for i in range(30))  # 31 texts for the model

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        explanation = asyncio.create_task(client.post("/v1/explain", json={"text": text}))
        while not model.calls and not model.inside:
            await asyncio.sleep(0.001)
        classified = await client.post("/v1/classify", json={"text": "a question"})
        return await explanation, classified

    explained, classified = asyncio.run(_with_app(app, body))
    assert explained.status_code == 200 and classified.status_code == 200
    assert len(explained.json()["words"]) == 30
    # Never more than one chunk of the explanation in a model call, whatever else shares it.
    assert all(sum(t != "a question" for t in call) <= EXPLAIN_CHUNK for call in model.calls), model.calls
    asked = next(i for i, call in enumerate(model.calls) if "a question" in call)
    chunks = [i for i, call in enumerate(model.calls) if any(t != "a question" for t in call)]
    assert len(chunks) == -(-31 // EXPLAIN_CHUNK)
    assert asked < chunks[-1], "the classification did not wait for the whole explanation"


def test_too_many_explanations_at_once_are_refused_and_classification_still_answers() -> None:
    gate = threading.Event()
    model = RecordingModel()
    app = create_app(settings_for(max_wait_ms=0, retry_after_s=3), model_factory=lambda _s: model)
    admitted = EXPLAIN_IN_FLIGHT + EXPLAIN_WAITING

    async def body(client: httpx.AsyncClient) -> tuple[list[httpx.Response], httpx.Response, httpx.Response, str]:
        model.gate = gate  # from now on the model blocks until the gate opens
        lane: ExplainLane = app.state.serve.explainer
        waiting = [
            asyncio.create_task(client.post("/v1/explain", json={"text": f"text number {i}"})) for i in range(admitted)
        ]
        while lane.admitted < admitted or not model.entered.is_set():
            await asyncio.sleep(0.005)
        refused = await client.post("/v1/explain", json={"text": "one too many"})
        # Classification is not behind the waiting explanations: it queues beside one chunk at most.
        classified = asyncio.create_task(client.post("/v1/classify", json={"text": "a question"}))
        await asyncio.sleep(0.05)
        gate.set()
        answered = await asyncio.gather(*waiting)
        metrics = (await client.get("/metrics")).text
        return answered, refused, await classified, metrics

    answered, refused, classified, metrics = asyncio.run(_with_app(app, body))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert "busy explaining" in refused.json()["detail"]
    assert 'tuneforge_rejected_requests_total{reason="explain_busy"} 1.0' in metrics
    assert [r.status_code for r in answered] == [200] * admitted
    assert classified.status_code == 200
    asked = next(i for i, call in enumerate(model.calls) if "a question" in call)
    assert asked <= 1, "the classification ran in the first batch after the blocked one"


def test_an_explanation_past_its_deadline_is_503_waiting_and_504_in_the_model() -> None:
    gate = threading.Event()
    model = FakeModel()
    app = create_app(settings_for(max_wait_ms=0, request_timeout_s=0.3), model_factory=lambda _s: model)

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        model.gate = gate
        first = asyncio.create_task(client.post("/v1/explain", json={"text": "lovely film"}))
        while not model.entered.is_set():
            await asyncio.sleep(0.005)
        second = await client.post("/v1/explain", json={"text": "awful plot"})
        answer = await first
        gate.set()
        return answer, second

    first, second = asyncio.run(_with_app(app, body))
    assert first.status_code == 504 and "did not answer within" in first.json()["detail"]
    assert second.status_code == 503 and "for its turn to be explained" in second.json()["detail"]
