"""The HTTP server: every limit and status code, auth, readiness, metrics, batching, graceful shutdown.

Most tests use an in-process app (FastAPI's TestClient, or httpx on the ASGI app for concurrency);
the shutdown and CLI tests run a real uvicorn server on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from tests.conftest import make_rows
from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.serve.app import create_app
from tuneforge.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from tuneforge.serve.settings import API_KEY_ENV, ServeSettings

torch.set_num_threads(1)

LABELS = ["happy", "meh", "sad"]
KEY = "s3cret-key-123"

# --- shared helpers (also used by test_serve_browser.py and test_predict_stream.py) ---------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_process_ready(process: subprocess.Popen[str], url: str, timeout: float = 90) -> None:
    """Until ``url``/ready answers 200; fails with the server's stderr if the process ends first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


class UvicornThread:
    """A real uvicorn server on a free loopback port, in a thread of the test process."""

    def __init__(self, app: Any, *, graceful_timeout: int = 30) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=graceful_timeout,
        )
        self.server = uvicorn.Server(config)
        # Signal handlers can only be installed on the main thread; the test stops it by should_exit,
        # which is exactly what uvicorn's own SIGTERM handler sets.
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- fakes and fixtures ----------------------------------------------------------------------------


class FakeModel:
    """Probabilities that depend on the text (so order mistakes show), optionally slow or gated."""

    form = "model"

    def __init__(self, *, delay: float = 0.0, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.labels = list(LABELS)
        self.delay = delay
        self.gate = gate
        self.fail = fail
        self.batches: list[int] = []
        self.seen = 0  # texts answered
        self.inside = 0  # texts in the model right now
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        warm_up = texts == ["warm up"]
        if not warm_up:
            with self.lock:
                self.inside += len(texts)
            self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail and not warm_up:
            raise RuntimeError("secret internal detail /srv/models/xyz")
        if self.delay:
            time.sleep(self.delay)
        if not warm_up:
            with self.lock:
                self.inside -= len(texts)
                self.batches.append(len(texts))
                self.seen += len(texts)
        rows = np.full((len(texts), 3), 0.1, dtype=np.float32)
        for i, text in enumerate(texts):
            rows[i, len(text) % 3] = 0.8
        return rows


def settings_for(run_dir: Path | str = "/nonexistent-run", **overrides: Any) -> ServeSettings:
    return ServeSettings(run_dir=Path(run_dir), threads=1, **overrides)


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "model not ready in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny_run(trained_tiny_run: Path) -> Path:
    return trained_tiny_run


@pytest.fixture(scope="module")
def real_client(tiny_run: Path) -> Iterator[TestClient]:
    """The app on the tiny trained run with the real Predictor, small limits to test against."""
    app = create_app(settings_for(tiny_run, max_texts_per_request=8, max_chars=100, max_wait_ms=2))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def fake_client(model: FakeModel | None = None, **overrides: Any) -> TestClient:
    model = model or FakeModel()
    return TestClient(create_app(settings_for(**overrides), model_factory=lambda _s: model))


# --- classification with the real model ------------------------------------------------------------


def test_classify_one_text(real_client: TestClient) -> None:
    response = real_client.post("/v1/classify", json={"text": "a lovely film"})
    assert response.status_code == 200
    body = response.json()
    rid = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and body["request_id"] == rid
    [prediction] = body["predictions"]
    assert prediction["label"] in LABELS
    assert prediction["top_k"] == [{"label": prediction["label"], "probability": prediction["probability"]}]
    assert prediction["truncated"] is False
    assert body["latency_ms"] > 0 and re.fullmatch(r"[0-9a-f]{12}", body["model_version"])


def test_classify_a_list_matches_the_predictor_in_order(real_client: TestClient, tiny_run: Path) -> None:
    from tuneforge.infer.predictor import Predictor

    texts = [text for text, _ in make_rows(8, seed=5)]
    response = real_client.post("/v1/classify", json={"texts": texts, "top_k": 2})
    assert response.status_code == 200
    expected = Predictor(tiny_run).predict(texts, top_k=2)
    for got, want in zip(response.json()["predictions"], expected, strict=True):
        assert got["label"] == want.label
        assert got["probability"] == pytest.approx(want.probability, abs=1e-5)
        assert [item["label"] for item in got["top_k"]] == [label for label, _ in want.top_k]


def test_top_k_is_capped_at_the_label_count(real_client: TestClient) -> None:
    body = real_client.post("/v1/classify", json={"text": "okay plot", "top_k": 50}).json()
    top = body["predictions"][0]["top_k"]
    assert sorted(item["label"] for item in top) == LABELS
    probabilities = [item["probability"] for item in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)


def test_request_id_is_echoed_in_body_and_header(real_client: TestClient) -> None:
    response = real_client.post("/v1/classify", json={"text": "fine"}, headers={"X-Request-ID": "client-42.a"})
    assert response.headers["x-request-id"] == "client-42.a" and response.json()["request_id"] == "client-42.a"
    # An id that could inject into headers or logs is replaced, not echoed.
    response = real_client.post("/v1/classify", json={"text": "fine"}, headers={"X-Request-ID": "a b<script>"})
    assert response.headers["x-request-id"] != "a b<script>"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    # Errors carry it too.
    response = real_client.post("/v1/classify", json={"text": ""}, headers={"X-Request-ID": "err-1"})
    assert response.status_code == 422 and response.json()["request_id"] == "err-1"


def test_model_info(real_client: TestClient, tiny_run: Path) -> None:
    info = real_client.get("/v1/model").json()
    assert info["labels"] == LABELS and info["num_labels"] == 3
    assert info["form"] == "model" and info["variant"] is None
    assert info["run_dir"] == tiny_run.name and info["max_length"] == 32
    assert info["limits"]["max_texts_per_request"] == 8 and info["limits"]["max_chars"] == 100
    assert str(tiny_run.parent) not in json.dumps(info), "no server paths in responses"


# --- limits and validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"text": 5}, "valid string"),
        ({"texts": "one text"}, "valid list"),
        ({"texts": ["ok", 3]}, "valid string"),
        ({"text": "a", "top_k": "2"}, "valid integer"),
        ({"text": "a", "top_k": True}, "valid integer"),
        ({"text": "a", "top_k": 0}, "greater than or equal to 1"),
        ({}, "exactly one of 'text' or 'texts'"),
        ({"text": "a", "texts": ["b"]}, "exactly one of 'text' or 'texts'"),
        ({"txt": "typo"}, "Extra inputs"),
        (["a list"], "valid dictionary"),
        ({"text": ""}, "'text': empty text"),
        ({"text": " \n\t "}, "'text': empty text"),
        ({"text": None, "texts": ["b"]}, "'text': null is not allowed"),
        ({"texts": []}, "'texts': List should have at least 1 item"),
        ({"texts": ["fine", ""]}, "'texts'[1]: empty text"),
    ],
)
def test_bad_requests_are_422_with_a_clear_message(real_client: TestClient, payload: Any, fragment: str) -> None:
    response = real_client.post("/v1/classify", json=payload)
    assert response.status_code == 422
    body = response.json()
    assert any(fragment in item["msg"] for item in body["detail"]), body
    assert all(set(item) == {"loc", "msg", "type"} for item in body["detail"]), "inputs are not echoed back"


def test_malformed_json_is_422(real_client: TestClient) -> None:
    response = real_client.post("/v1/classify", content=b'{"text": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_too_many_texts_is_422(real_client: TestClient) -> None:
    response = real_client.post("/v1/classify", json={"texts": ["fine"] * 9})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "texts"]
    assert error["msg"] == "9 texts in one request; the limit is 8: split it"
    # The classification server counts these refusals by reason (its hook on the shared error handlers).
    assert 'tuneforge_rejected_requests_total{reason="too_many_texts"}' in real_client.get("/metrics").text


def test_too_long_text_is_422(real_client: TestClient) -> None:
    response = real_client.post("/v1/classify", json={"texts": ["fine", "x" * 101]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "texts", 1]
    assert error["msg"] == "'texts'[1] has 101 characters; the limit is 100 per text"


def test_too_long_text_is_cut_when_truncation_is_on() -> None:
    model = FakeModel()
    with fake_client(model, max_chars=10, truncate=True) as client:
        wait_ready(client)
        body = client.post("/v1/classify", json={"texts": ["x" * 25, "short"]}).json()
    assert [p["truncated"] for p in body["predictions"]] == [True, False]
    # The fake's answer depends on the length it saw: 10 characters, not 25.
    assert body["predictions"][0]["label"] == LABELS[10 % 3]
    # Truncation has a bound too: ten times the limit.
    with fake_client(model, max_chars=10, truncate=True) as client:
        wait_ready(client)
        response = client.post("/v1/classify", json={"text": "x" * 101})
    assert response.status_code == 422 and "the limit is 100 per text" in response.json()["detail"][0]["msg"]


def test_oversized_body_is_413_before_it_is_read() -> None:
    with fake_client(max_texts_per_request=2, max_chars=10) as client:
        wait_ready(client)
        limit = client.app.state.serve.settings.body_limit
        response = client.post("/v1/classify", json={"text": "y" * (limit + 10)})
        assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the size is counted as it arrives
            yield b'{"text": "'
            for _ in range(limit // 1000 + 2):
                yield b"z" * 1000
            yield b'"}'

        response = client.post("/v1/classify", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]


def test_unknown_path_and_method() -> None:
    with fake_client() as client:
        assert client.get("/v2/nothing").status_code == 404
        response = client.get("/v1/classify")
        assert response.status_code == 405 and response.json()["request_id"]


# --- readiness ---------------------------------------------------------------------------------------


def test_not_ready_until_the_model_has_loaded() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    with fake_client(model) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        assert ready.headers["retry-after"] == "1"
        response = client.post("/v1/classify", json={"text": "early"})
        assert response.status_code == 503 and "still loading" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
        assert client.get("/v1/model").status_code == 503
        assert "tuneforge_model_ready 0.0" in client.get("/metrics").text
        gate.set()
        wait_ready(client)
        assert client.post("/v1/classify", json={"text": "later"}).status_code == 200
        assert "tuneforge_model_ready 1.0" in client.get("/metrics").text


def test_a_model_that_fails_to_load_is_reported() -> None:
    def broken(_settings: ServeSettings) -> FakeModel:
        raise OSError("model.safetensors: truncated file")

    with TestClient(create_app(settings_for(), model_factory=broken)) as client:
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "failed"}
        response = client.post("/v1/classify", json={"text": "x"})
        assert response.status_code == 503
        assert response.json()["detail"] == "the model failed to load; see the server log"
        assert "retry-after" not in response.headers, "retrying will not help"
        assert client.get("/health").status_code == 200


# --- errors never leak internals ----------------------------------------------------------------------


def test_unexpected_error_is_a_generic_500_with_the_request_id() -> None:
    model = FakeModel(fail=True)
    # raise_server_exceptions stays on: the app answers the error itself instead of re-raising it.
    client = TestClient(create_app(settings_for(), model_factory=lambda _s: model))
    with client:
        wait_ready(client)
        response = client.post("/v1/classify", json={"text": "boom"}, headers={"X-Request-ID": "trace-me"})
        assert client.post("/v1/classify", json={"text": "next one is fine?"}).status_code == 500
    assert response.status_code == 500
    assert response.json() == {
        "detail": "internal server error; quote the request id when reporting it",
        "request_id": "trace-me",
    }
    assert response.headers["x-request-id"] == "trace-me"
    assert "secret" not in response.text and "Traceback" not in response.text


# --- auth and CORS -----------------------------------------------------------------------------------


def test_api_key_protects_the_api_but_not_health_or_ready() -> None:
    with fake_client(api_key=KEY) as client:
        wait_ready(client)
        for method, path in (("POST", "/v1/classify"), ("GET", "/v1/model"), ("GET", "/metrics")):
            response = client.request(method, path, json={"text": "x"})
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["detail"]
        assert client.post("/v1/classify", json={"text": "x"}, headers={"X-API-Key": "wrong-key-1"}).status_code == 401
        auth = {"Authorization": "Basic " + KEY}
        assert client.post("/v1/classify", json={"text": "x"}, headers=auth).status_code == 401
        # Unauthenticated requests are refused before their body is parsed: no 422 hints.
        assert client.post("/v1/classify", content=b"not json").status_code == 401
        assert client.post("/v1/classify", json={"text": "x"}, headers={"X-API-Key": KEY}).status_code == 200
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/classify", json={"text": "x"}, headers=bearer).status_code == 200
        assert client.get("/metrics", headers=bearer).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


def test_cli_takes_the_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tiny_run: Path) -> None:
    captured: dict[str, ServeSettings] = {}

    def fake_run_server(settings: ServeSettings, **_: Any) -> int:
        captured["settings"] = settings
        return 0

    monkeypatch.setattr("tuneforge.serve.server.run_server", fake_run_server)
    monkeypatch.setenv(API_KEY_ENV, "from-the-env-1")
    assert main(["serve", str(tiny_run), "--port", "0"]) == 0
    assert captured["settings"].api_key == "from-the-env-1"
    assert main(["serve", str(tiny_run), "--api-key", "from-the-flag-1"]) == 0
    assert captured["settings"].api_key == "from-the-flag-1"
    assert "from-the-flag-1" not in repr(captured["settings"])
    monkeypatch.delenv(API_KEY_ENV)
    assert main(["serve", str(tiny_run)]) == 0
    assert captured["settings"].api_key is None


def test_cors_is_off_by_default_and_allows_configured_origins() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with fake_client() as client:
        wait_ready(client)
        response = client.post("/v1/classify", json={"text": "x"}, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in client.options("/v1/classify", headers=preflight).headers
    with fake_client(cors_origins=("https://app.example",), api_key=KEY) as client:
        wait_ready(client)
        response = client.options(
            "/v1/classify", headers={**preflight, "Access-Control-Request-Headers": "authorization,content-type"}
        )
        assert response.status_code == 200  # preflight needs no key
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        response = client.post(
            "/v1/classify", json={"text": "x"}, headers={"Origin": "https://app.example", "X-API-Key": KEY}
        )
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        other = client.options("/v1/classify", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# --- metrics -----------------------------------------------------------------------------------------


def test_metrics_content(real_client: TestClient) -> None:
    real_client.post("/v1/classify", json={"texts": ["great", "awful", "okay"]})
    real_client.post("/v1/classify", json={"text": ""})
    response = real_client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'tuneforge_http_requests_total\{method="POST",route="/v1/classify",status="200"\} \d', text)
    assert re.search(r'tuneforge_http_requests_total\{method="POST",route="/v1/classify",status="422"\} \d', text)
    assert 'tuneforge_http_request_duration_seconds_bucket{le="0.25",route="/v1/classify"}' in text
    assert "tuneforge_batch_size_texts_bucket" in text and "tuneforge_batch_size_texts_count" in text
    assert 'tuneforge_batch_size_texts_bucket{le="4.0"}' in text
    assert "# TYPE tuneforge_queue_depth_texts gauge" in text and "tuneforge_queue_depth_texts 0.0" in text
    assert "tuneforge_texts_classified_total" in text and "tuneforge_model_ready 1.0" in text
    assert 'tuneforge_rejected_requests_total{reason="' not in text or "unauthorized" not in text


def test_two_apps_keep_separate_metrics() -> None:
    with fake_client() as first, fake_client() as second:
        wait_ready(first)
        wait_ready(second)
        first.post("/v1/classify", json={"text": "x"})
        assert 'route="/v1/classify"' in first.get("/metrics").text
        assert 'route="/v1/classify"' not in second.get("/metrics").text


def test_unknown_paths_do_not_create_metric_series() -> None:
    with fake_client() as client:
        for i in range(5):
            client.get(f"/random/{i}")
        text = client.get("/metrics").text
    assert "/random/" not in text
    assert 'route="unmatched",status="404"} 5.0' in text


# --- dynamic batching over HTTP ------------------------------------------------------------------------


async def _with_app(app: Any, body: Callable[[httpx.AsyncClient], Any]) -> Any:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            for _ in range(500):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            return await body(client)


def test_concurrent_requests_share_batches_counted_in_texts() -> None:
    model = FakeModel(delay=0.02)
    app = create_app(settings_for(max_batch_size=6, max_wait_ms=30), model_factory=lambda _s: model)

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        payloads = [{"texts": [f"text {i}", f"x{i}", f"yy {i}"]} for i in range(12)]
        return await asyncio.gather(*(client.post("/v1/classify", json=p) for p in payloads))

    responses = asyncio.run(_with_app(app, body))
    assert all(r.status_code == 200 for r in responses)
    assert model.seen == 36
    assert max(model.batches) <= 6, model.batches  # 3 texts per request: at most 2 requests per batch
    assert len(model.batches) < 12, "requests were batched together"
    # Each request got its own texts' answers back.
    for i, response in enumerate(responses):
        expected = [LABELS[len(t) % 3] for t in (f"text {i}", f"x{i}", f"yy {i}")]
        assert [p["label"] for p in response.json()["predictions"]] == expected


def test_full_queue_answers_503_with_retry_after() -> None:
    gate = threading.Event()
    model = FakeModel()
    app = create_app(
        settings_for(max_batch_size=2, max_wait_ms=0, max_queue=4, max_texts_per_request=4, retry_after_s=2),
        model_factory=lambda _s: model,
    )

    async def body(client: httpx.AsyncClient) -> tuple[list[httpx.Response], httpx.Response, str]:
        model.gate = gate  # from now on the model blocks: the first batch occupies it, the rest queue
        batcher = app.state.serve.batcher
        first = asyncio.create_task(client.post("/v1/classify", json={"texts": ["a", "b"]}))
        while not model.entered.is_set():
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(client.post("/v1/classify", json={"texts": ["c", "d"]})) for _ in range(2)]
        while batcher.queued_texts < 4:
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/classify", json={"text": "one too many"})
        metrics = (await client.get("/metrics")).text
        # The model is blocked in its own thread; the event loop still answers at once.
        started = time.monotonic()
        assert (await client.get("/health")).status_code == 200 and time.monotonic() - started < 1.0
        gate.set()
        return await asyncio.gather(first, *queued), refused, metrics

    accepted, refused, metrics = asyncio.run(_with_app(app, body))
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert "queue full" in refused.json()["detail"]
    assert "tuneforge_queue_depth_texts 4.0" in metrics
    assert 'tuneforge_rejected_requests_total{reason="queue_full"} 1.0' in metrics
    assert [r.status_code for r in accepted] == [200, 200, 200]


def test_after_shutdown_begins_work_is_refused_with_503() -> None:
    model = FakeModel()
    app = create_app(settings_for(), model_factory=lambda _s: model)

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                while (await client.get("/ready")).status_code != 200:
                    await asyncio.sleep(0.01)
        # The lifespan has ended (as after SIGTERM); a request that still reaches the app is refused.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return (
                await client.post("/v1/classify", json={"text": "late"}),
                await client.get("/ready"),
                await client.get("/health"),
            )

    late, ready, health = asyncio.run(scenario())
    assert late.status_code == 503 and late.json()["detail"] == "the server is shutting down"
    assert late.headers["retry-after"] == "1"
    assert ready.status_code == 503 and ready.json()["status"] == "shutting down"
    assert health.status_code == 200


def classify_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a POST /v1/classify, for driving the app by hand (raw headers, disconnects)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


def test_invalid_content_length_is_400() -> None:
    app = create_app(settings_for(), model_factory=lambda _s: FakeModel())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = classify_scope([(b"content-type", b"application/json"), (b"content-length", b"-5")])
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["detail"] == "invalid Content-Length header"


def test_worker_processes_rebuild_the_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneforge.serve.server import app_from_env, prepare_settings
    from tuneforge.serve.settings import SETTINGS_ENV

    settings = settings_for(max_batch_size=7, cors_origins=("https://a.example",), api_key=KEY, truncate=True)
    env = settings.to_env()
    assert KEY not in env[SETTINGS_ENV], "the key travels in its own variable, not in the settings dump"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ServeSettings.from_env() == settings
    app = app_from_env()
    assert app.state.serve.settings == settings
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("tuneforge.serve.server.open_run_dir", lambda _path: None)
    prepared = prepare_settings(ServeSettings(run_dir=Path("x"), workers=4, port=0))
    assert prepared.threads == 2, "workers share the cores instead of each taking all of them"


# --- the batcher on its own ------------------------------------------------------------------------------


def _probs(texts: list[str]) -> np.ndarray:
    return np.array([[float(len(t)), 0.0] for t in texts])


def test_batcher_counts_texts_and_keeps_requests_whole() -> None:
    calls: list[list[str]] = []

    def infer(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return _probs(texts)

    async def scenario() -> list[np.ndarray]:
        batcher = DynamicBatcher(infer, max_batch_size=4, max_wait_s=0.05, max_queue=100)
        batcher.start()
        results = await asyncio.gather(
            batcher.submit(["a", "bb", "ccc"]),
            batcher.submit(["dddd", "e"]),
            batcher.submit(["ffffff" * 2] * 6),  # larger than a batch: runs alone, not split
            batcher.submit(["g"]),
        )
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    # 4 texts per batch at most, whole requests only; a request larger than a batch runs alone.
    assert [len(c) for c in calls] == [3, 2, 6, 1]
    assert [r[:, 0].tolist() for r in results] == [[1, 2, 3], [4, 1], [12] * 6, [1]]


def test_batcher_waits_at_most_max_wait_for_company() -> None:
    async def scenario() -> float:
        batcher = DynamicBatcher(_probs, max_batch_size=32, max_wait_s=0.1, max_queue=100)
        batcher.start()
        started = time.monotonic()
        await batcher.submit(["alone"])
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    assert 0.09 <= elapsed < 1.0


def test_batcher_does_not_wait_when_a_batch_is_full() -> None:
    async def scenario() -> float:
        batcher = DynamicBatcher(_probs, max_batch_size=2, max_wait_s=5.0, max_queue=100)
        batcher.start()
        started = time.monotonic()
        await asyncio.gather(batcher.submit(["a"]), batcher.submit(["b"]))
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 1.0


def test_batcher_refuses_when_full_and_after_close_and_drains_on_close() -> None:
    gate = threading.Event()

    def slow(texts: list[str]) -> np.ndarray:
        gate.wait(10)
        return _probs(texts)

    async def scenario() -> None:
        batcher = DynamicBatcher(slow, max_batch_size=1, max_wait_s=0, max_queue=3)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(["first"]))
        while batcher.queued_texts:  # wait until the first text is in the model
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        waiting = [asyncio.ensure_future(batcher.submit([f"t{i}"])) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.queued_texts == 3
        with pytest.raises(QueueFullError):
            await batcher.submit(["over"])
        closing = asyncio.ensure_future(batcher.close(timeout_s=10))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosedError):
            await batcher.submit(["late"])
        gate.set()
        await closing
        assert [(await w)[0, 0] for w in waiting] == [2.0, 2.0, 2.0]
        assert (await running)[0, 0] == 5.0

    asyncio.run(scenario())


def test_batcher_errors_reach_only_that_batch_and_cancelled_requests_are_skipped() -> None:
    seen: list[list[str]] = []

    def infer(texts: list[str]) -> np.ndarray:
        seen.append(list(texts))
        if "bad" in texts:
            raise ValueError("model exploded")
        return _probs(texts)

    async def scenario() -> None:
        batcher = DynamicBatcher(infer, max_batch_size=1, max_wait_s=0.05, max_queue=10)
        batcher.start()
        with pytest.raises(ValueError, match="exploded"):
            await batcher.submit(["bad"])
        assert (await batcher.submit(["good"]))[0, 0] == 4.0
        task = asyncio.ensure_future(batcher.submit(["gone"]))
        await asyncio.sleep(0)
        task.cancel()
        assert (await batcher.submit(["kept"]))[0, 0] == 4.0
        await batcher.close()

    asyncio.run(scenario())
    assert ["gone"] not in seen


# --- graceful shutdown on a real server -------------------------------------------------------------------


def test_graceful_shutdown_answers_every_accepted_request() -> None:
    model = FakeModel(delay=0.15)
    app = create_app(settings_for(max_batch_size=4, max_wait_ms=1), model_factory=lambda _s: model)
    n = 24
    results: list[int | str] = []

    async def clients(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one(i: int) -> None:
                try:
                    response = await client.post("/v1/classify", json={"text": f"request {i}"})
                    results.append(response.status_code)
                except httpx.HTTPError as exc:
                    results.append(type(exc).__name__)

            await asyncio.gather(*(one(i) for i in range(n)))

    with UvicornThread(app) as server:
        server.wait_ready()
        runner = threading.Thread(target=asyncio.run, args=(clients(server.url),))
        runner.start()
        batcher = app.state.serve.batcher
        deadline = time.monotonic() + 30
        # Shut down once every request is accepted (queued or in the model) but most are still waiting.
        while model.seen + model.inside + batcher.queued_texts < n:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert batcher.queued_texts >= n // 2
        server.server.should_exit = True  # what uvicorn's SIGTERM handler does
        runner.join(timeout=60)
        server.thread.join(timeout=60)
        assert not server.thread.is_alive()
        # A new client after shutdown finds nobody listening.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
    assert results == [200] * n
    assert model.seen == n
    assert batcher.closing and batcher.queued_texts == 0


# --- the CLI --------------------------------------------------------------------------------------------------


def test_serve_cli_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture, tiny_run: Path) -> None:
    cases = [
        ([str(tiny_run.parent / "missing")], "run directory not found"),
        ([str(tiny_run), "--max-batch-size", "0"], "--max-batch-size: must be at least 1"),
        ([str(tiny_run), "--max-texts", "100", "--max-queue", "50"], "--max-queue: must be at least --max-texts"),
        ([str(tiny_run), "--api-key", "short"], "--api-key: must be at least 8 characters"),
        ([str(tiny_run), "--cors-origin", "example.com"], "--cors-origin:"),
    ]
    for args, fragment in cases:
        capsys.readouterr()
        assert main(["serve", *args]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        capsys.readouterr()
        assert main(["serve", str(tiny_run), "--port", str(port)]) == EXIT_BAD_INPUT
        assert f"--port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_cli_runs_and_stops_cleanly_on_sigterm(tiny_run: Path) -> None:
    port = free_port()
    env = {**os.environ, "TUNEFORGE_API_KEY": KEY}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "serve",
            str(tiny_run),
            "--port",
            str(port),
            "--threads",
            "1",
            "--public-docs",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_process_ready(process, url)
        response = httpx.post(f"{url}/v1/classify", json={"text": "superb acting"}, headers={"X-API-Key": KEY})
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] in LABELS
        assert httpx.post(f"{url}/v1/classify", json={"text": "no key"}).status_code == 401
        assert httpx.get(f"{url}/docs").status_code == 200
        css = httpx.get(f"{url}/docs/static/swagger-ui.css")
        assert css.status_code == 200 and len(css.content) > 10_000, "Swagger UI is served locally"
        assert "https://" not in httpx.get(f"{url}/docs").text.replace("https://fastapi", "")
        assert "/v1/classify" in httpx.get(f"{url}/openapi.json").json()["paths"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # uvicorn re-raises the signal after its graceful shutdown, as a process stopped by SIGTERM should.
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr
    assert "Traceback" not in stderr and "model ready" in stderr


def test_serving_never_imports_training_code(tiny_run: Path) -> None:
    code = (
        "import sys\n"
        "import tuneforge.serve.app, tuneforge.serve.server, tuneforge.infer.stream\n"
        "from tuneforge.serve.model import load_predictor\n"
        "from tuneforge.serve.settings import ServeSettings\n"
        f"load_predictor(ServeSettings(run_dir={str(tiny_run)!r}, threads=1)).predict_proba(['x'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('tuneforge.train')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
