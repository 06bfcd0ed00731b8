"""Serving under misuse: the API key under any mount, one bad request among good ones, huge bodies,
deadlines, clients that leave, metrics across worker processes, a run whose labels do not fit its model.

Helpers and fakes come from test_serve.py; every test here failed before the change it covers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.test_serve import (
    KEY,
    LABELS,
    FakeModel,
    _with_app,
    classify_scope,
    fake_client,
    free_port,
    settings_for,
    wait_ready,
)
from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.errors import RunDirError
from tuneforge.serve.app import create_app
from tuneforge.serve.server import startup_warnings
from tuneforge.serve.settings import ServeSettings


@pytest.fixture(scope="module")
def tiny_run(trained_tiny_run: Path) -> Path:
    return trained_tiny_run


class RecordingModel(FakeModel):
    """FakeModel that keeps every text it was given and fails on any batch holding a poisoned text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.texts: list[str] = []
        self.failed_calls: list[int] = []

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if texts != ["warm up"]:
            self.texts.extend(texts)
        if any("poison" in text for text in texts):
            self.failed_calls.append(len(texts))
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return super().predict_proba(texts)


# --- 1. the API key --------------------------------------------------------------------------------


PROTECTED = [
    ("POST", "/v1/classify"),
    ("GET", "/v1/model"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/"),
    ("GET", "/not-a-route"),
]


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_the_api_key_protects_every_route_under_any_root_path(root_path: str) -> None:
    # uvicorn --root-path /api hands the app path "/api/metrics" with root_path "/api".
    app = create_app(settings_for(api_key=KEY), model_factory=lambda _s: FakeModel())
    with TestClient(app, root_path=root_path) as client:
        for method, path in PROTECTED:
            response = client.request(method, root_path + path, json={"text": "x"})
            assert response.status_code == 401, (root_path, path)
        assert client.get(root_path + "/health").status_code == 200
        deadline = time.monotonic() + 30
        while client.get(root_path + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        response = client.post(root_path + "/v1/classify", json={"text": "x"}, headers={"X-API-Key": KEY})
        assert response.status_code == 200
        assert client.get(root_path + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_api_key_protects_an_app_mounted_under_a_prefix() -> None:
    app = create_app(settings_for(api_key=KEY), model_factory=lambda _s: FakeModel())
    outer = Starlette(routes=[Mount("/tuneforge", app=app)])
    with TestClient(outer) as client:
        for method, path in PROTECTED:
            assert client.request(method, "/tuneforge" + path, json={"text": "x"}).status_code == 401, path
        assert client.get("/tuneforge/health").status_code == 200


def test_public_docs_open_the_docs_and_nothing_else() -> None:
    with fake_client(api_key=KEY, public_docs=True) as client:
        for path in ("/", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        for method, path in PROTECTED[:3]:
            assert client.request(method, path, json={"text": "x"}).status_code == 401, path


def test_docs_and_the_cli_follow_the_root_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_run: Path
) -> None:
    with TestClient(create_app(settings_for()), root_path="/api") as client:
        page = client.get("/api/docs").text
        assert "url: '/api/openapi.json'" in page and "/api/docs/static/swagger-ui-bundle.js" in page
        assert client.get("/api/docs/static/swagger-ui.css").status_code == 200
        assert client.get("/api/openapi.json").json()["servers"] == [{"url": "/api"}]
    configs: list[Any] = []
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets=None: configs.append(self.config))
    main(["serve", str(tiny_run), "--port", "0", "--root-path", "/api"])
    assert configs[0].root_path == "/api"
    capsys.readouterr()
    assert main(["serve", str(tiny_run), "--root-path", "api/"]) == EXIT_BAD_INPUT
    assert "--root-path: 'api/' is not a path like /api" in capsys.readouterr().err


def test_the_cli_reads_the_api_key_from_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_run: Path, tmp_path: Path
) -> None:
    captured: dict[str, ServeSettings] = {}

    def fake_run_server(settings: ServeSettings, **_: Any) -> int:
        captured["settings"] = settings
        return 0

    monkeypatch.setattr("tuneforge.serve.server.run_server", fake_run_server)
    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file-123\n", encoding="utf-8")
    assert main(["serve", str(tiny_run), "--api-key-file", str(key_file)]) == 0
    assert captured["settings"].api_key == "from-a-file-123"
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    cases = [
        (["--api-key-file", str(tmp_path / "missing")], "--api-key-file: "),
        (["--api-key-file", str(tmp_path / "empty")], "is empty"),
        (["--api-key-file", str(key_file), "--api-key", "another-key-1"], "--api-key-file: give the key once"),
    ]
    for args, fragment in cases:
        capsys.readouterr()
        assert main(["serve", str(tiny_run), *args]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err


def test_a_warning_when_listening_beyond_this_machine_without_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_run: Path
) -> None:
    assert startup_warnings(settings_for(host="127.0.0.1")) == []
    assert startup_warnings(settings_for(host="::1")) == []
    assert startup_warnings(settings_for(host="0.0.0.0", api_key=KEY)) == []
    [warning] = startup_warnings(settings_for(host="0.0.0.0"))
    assert "0.0.0.0 without an API key" in warning
    # And the CLI prints it before serving (the server itself is not started here).
    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets=None: None)
    main(["serve", str(tiny_run), "--host", "0.0.0.0", "--port", "0"])
    assert "warning: listening on 0.0.0.0 without an API key" in capsys.readouterr().err


# --- 2. one bad request never fails another ------------------------------------------------------------


def test_a_lone_surrogate_is_422_naming_the_text(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run), model_factory=None)
    with TestClient(app) as client:
        wait_ready(client)
        body = b'{"texts": ["fine", "bad \\ud800 text"]}'
        response = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "texts", 1] and "not valid Unicode" in error["msg"]
        # A surrogate pair spelt in escapes is one valid character, and is classified.
        pair = b'{"text": "smile \\ud83d\\ude00"}'
        assert (
            client.post("/v1/classify", content=pair, headers={"Content-Type": "application/json"}).status_code == 200
        )


def test_one_poisoned_request_among_good_ones_fails_alone() -> None:
    gate = threading.Event()
    model = RecordingModel()
    app = create_app(settings_for(max_batch_size=64, max_wait_ms=1), model_factory=lambda _s: model)

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, list[httpx.Response], httpx.Response]:
        model.gate = gate  # the first request holds the model, so the rest queue up and form one batch
        first = asyncio.create_task(client.post("/v1/classify", json={"text": "first"}))
        while not model.entered.is_set():
            await asyncio.sleep(0.01)
        good = [asyncio.create_task(client.post("/v1/classify", json={"texts": [f"good {i}"]})) for i in range(12)]
        poisoned = asyncio.create_task(client.post("/v1/classify", json={"texts": ["fine", "poison"]}))
        batcher = app.state.serve.batcher
        while batcher.queued_texts < 14:
            await asyncio.sleep(0.01)
        gate.set()
        return await first, list(await asyncio.gather(*good)), await poisoned

    first, good, poisoned = asyncio.run(_with_app(app, body))
    assert model.failed_calls[0] == 14, "the poisoned text shared a batch with the good ones"
    assert first.status_code == 200
    assert [r.status_code for r in good] == [200] * 12
    for i, response in enumerate(good):
        assert response.json()["predictions"][0]["label"] == LABELS[len(f"good {i}") % 3]
    assert poisoned.status_code == 500 and "Traceback" not in poisoned.text


def test_a_tokenizer_error_in_a_batch_fails_only_its_own_request(tiny_run: Path) -> None:
    from tuneforge.infer.predictor import Predictor
    from tuneforge.serve.batcher import DynamicBatcher

    predictor = Predictor(tiny_run, threads=1)

    async def scenario() -> list[Any]:
        batcher = DynamicBatcher(predictor.predict_proba, max_batch_size=64, max_wait_s=0.2)
        batcher.start()
        # Past validation (as from a client of the batcher other than the HTTP app): the real tokenizer
        # raises on the lone surrogate, in the same batch as the good texts.
        texts = [["a lovely film"], ["dull"], ["bad \ud800"], ["fine plot", "okay"]]
        results = await asyncio.gather(*(batcher.submit(t) for t in texts), return_exceptions=True)
        await batcher.close()
        return results

    good1, good2, bad, good3 = asyncio.run(scenario())
    assert isinstance(bad, TypeError)
    assert [np.asarray(r).shape for r in (good1, good2, good3)] == [(1, 3), (1, 3), (2, 3)]
    assert np.allclose(good3, predictor.predict_proba(["fine plot", "okay"]), atol=1e-5)


# --- 3. bounded work per request ----------------------------------------------------------------------


def test_a_huge_list_of_numbers_costs_one_short_error() -> None:
    with fake_client() as client:
        wait_ready(client)
        payload = json.dumps({"texts": list(range(150_000))}).encode()
        assert len(payload) < client.app.state.serve.settings.body_limit, "the body passes the size check"
        response = client.post("/v1/classify", content=payload, headers={"Content-Type": "application/json"})
        assert response.status_code == 422
        assert len(response.content) < 1_000
        [error] = response.json()["detail"]
        assert error["msg"] == "150000 texts in one request; the limit is 64: split it"
        # Within the item limit, wrong items are listed up to a handful, then counted.
        response = client.post("/v1/classify", json={"texts": list(range(40))})
        detail = response.json()["detail"]
        assert response.status_code == 422 and len(detail) == 6
        assert detail[0]["loc"] == ["body", "texts", 0] and detail[-1]["msg"] == "and 35 more errors"


def test_the_published_schema_states_the_limits_and_the_one_of_rule() -> None:
    with fake_client(max_texts_per_request=5, max_chars=30) as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]
    assert schema["properties"]["texts"]["maxItems"] == 5
    assert schema["properties"]["texts"]["items"]["maxLength"] == 30
    assert schema["properties"]["text"]["maxLength"] == 30
    assert schema["oneOf"] == [{"required": ["text"]}, {"required": ["texts"]}]
    assert schema["additionalProperties"] is False


# --- 4. deadlines, a stuck model, clients that leave ----------------------------------------------------


def test_deadlines_answer_504_in_the_model_and_503_in_the_queue_and_ready_reports_stuck() -> None:
    gate = threading.Event()
    model = RecordingModel()
    app = create_app(
        settings_for(max_batch_size=1, max_wait_ms=0, request_timeout_s=0.3), model_factory=lambda _s: model
    )

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, httpx.Response, str]:
        model.gate = gate  # the model hangs until the test opens the gate
        in_model = asyncio.create_task(client.post("/v1/classify", json={"text": "in the model"}))
        while not model.entered.is_set():
            await asyncio.sleep(0.01)
        queued = await client.post("/v1/classify", json={"text": "left in the queue"})
        ready = await client.get("/ready")
        metrics = (await client.get("/metrics")).text
        first = await in_model
        gate.set()
        while (await client.get("/ready")).status_code != 200:
            await asyncio.sleep(0.01)
        return first, queued, ready, metrics

    first, queued, ready, metrics = asyncio.run(_with_app(app, body))
    assert first.status_code == 504 and first.json()["detail"] == "the model did not answer within 0.3 s"
    assert queued.status_code == 503 and queued.headers["retry-after"] == "1"
    assert queued.json()["detail"] == "the server is overloaded: the request waited 0.3 s in the queue; retry shortly"
    assert ready.status_code == 503 and ready.json() == {"status": "stuck"}
    assert 'reason="deadline_in_queue"} 1.0' in metrics
    assert "left in the queue" not in model.texts, "a request past its deadline never reaches the model"


def test_a_request_whose_client_has_left_is_skipped() -> None:
    gate = threading.Event()
    model = RecordingModel()
    app = create_app(settings_for(max_batch_size=1, max_wait_ms=0), model_factory=lambda _s: model)
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b'{"text": "nobody waits for me"}', "more_body": False}]
    leave = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = classify_scope([(b"content-type", b"application/json")])

    async def body(client: httpx.AsyncClient) -> tuple[int, httpx.Response]:
        model.gate = gate
        busy = asyncio.create_task(client.post("/v1/classify", json={"text": "keeps the model busy"}))
        while not model.entered.is_set():
            await asyncio.sleep(0.01)
        batcher = app.state.serve.batcher
        gone = asyncio.create_task(app(scope, receive, send))
        while batcher.queued_texts < 1:
            await asyncio.sleep(0.01)
        leave.set()  # the client closes its connection while its request waits
        await asyncio.wait_for(gone, 10)
        depth = batcher.queued_texts
        gate.set()
        return depth, await busy

    depth, busy = asyncio.run(_with_app(app, body))
    assert depth == 0, "the request left the queue with its client"
    assert busy.status_code == 200
    assert model.texts == ["keeps the model busy"], "the model never saw the abandoned text"


# --- 5. metrics across worker processes ------------------------------------------------------------------


def _count(metrics: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_metrics_add_up_across_two_worker_processes(tiny_run: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "tuneforge", "serve", str(tiny_run), "--port", str(port), "--workers", "2"]
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    n = 24
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while ready < 10:  # many answers in a row, on new connections: both workers have their model
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "server not ready"
            try:
                ready = ready + 1 if httpx.get(f"{url}/ready", timeout=2).status_code == 200 else 0
            except httpx.HTTPError:
                ready = 0
            time.sleep(0.1)

        async def burst() -> list[int]:
            # A connection per request, several at a time: the workers share them out.
            async def one(i: int) -> int:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    return (await client.post("/v1/classify", json={"text": f"request {i}"})).status_code

            return list(await asyncio.gather(*(one(i) for i in range(n))))

        assert asyncio.run(burst()) == [200] * n
        scrapes = [httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text for _ in range(6)]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
    for text in scrapes:
        # Whichever worker answers the scrape, it counts the requests of both.
        count = _count(text, "tuneforge_http_requests_total", route="/v1/classify", method="POST", status="200")
        assert count == n, text
        assert _count(text, "tuneforge_texts_classified_total") == n
        assert _count(text, "tuneforge_model_ready") == 1.0


# --- 6. a run whose labels do not fit its model; the drain timeout ---------------------------------------


@pytest.fixture()
def mislabelled_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "labels.json").write_text(json.dumps(["yes", "no"]), encoding="utf-8")  # the model has 3 outputs
    return run


def test_labels_that_do_not_fit_the_model_stop_it_loading(mislabelled_run: Path) -> None:
    from tuneforge.infer.predictor import Predictor

    with pytest.raises(RunDirError, match=r"labels.json: 2 labels, but the model .* has 3 outputs"):
        Predictor(mislabelled_run)
    with TestClient(create_app(settings_for(mislabelled_run))) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/ready").json() == {"status": "failed"}
        assert client.post("/v1/classify", json={"text": "x"}).status_code == 503


def test_the_drain_timeout_is_validated_and_never_rounded_down_to_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tiny_run: Path
) -> None:
    for value in ("0", "-1"):
        capsys.readouterr()
        assert main(["serve", str(tiny_run), "--drain-timeout", value]) == EXIT_BAD_INPUT
        assert "--drain-timeout: must be in (0, 3600] seconds" in capsys.readouterr().err
    configs: list[Any] = []
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets=None: configs.append(self.config))
    main(["serve", str(tiny_run), "--port", "0", "--drain-timeout", "0.5"])
    assert configs[0].timeout_graceful_shutdown == 1
