"""The monitor's HTTP side (tuneforge.apps.monitor.server): POST /v1/ingest (idempotent, per-item answers, bad
input refused with a reason per item, the API key, the body limit), the dashboard's queries (and the window
sums they read, against the items), explanations of stored texts, the configured source read beside the API,
and `tuneforge monitor serve` as a process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from tests.test_monitor import HOUR, RULES, T0, TINY_ROLES, KeywordScorer, iso_at, raw_config, stream_rows, write_jsonl
from tests.test_serve import free_port, wait_for_process_ready
from tuneforge.apps.monitor import rollup, views
from tuneforge.apps.monitor.aggregate import series
from tuneforge.apps.monitor.config import MonitorConfig, validate_monitor_config
from tuneforge.apps.monitor.items import OVERALL, Record
from tuneforge.apps.monitor.runner import Monitor
from tuneforge.apps.monitor.server import create_monitor_app, monitor_serve_settings
from tuneforge.apps.monitor.sinks import Sinks
from tuneforge.apps.monitor.store import Store
from tuneforge.cli import main

KEY = "monitor-test-key"
SECTIONS: dict[str, Any] = {
    "rules": RULES,
    "entities": {"aliases": {"ACME": "ACME"}},
    "source": {"type": "stdin", "lateness": "0s"},
}


def monitor_config(tmp_path: Path, **sections: Any) -> MonitorConfig:
    return validate_monitor_config(raw_config(tmp_path, **{**SECTIONS, **sections}))


def keyword_monitor(config: MonitorConfig, store: Store) -> Monitor:
    return Monitor(config, store=store, scorer=KeywordScorer(), sinks=Sinks([]))


@contextmanager
def serving(config: MonitorConfig, *, factory: Any = keyword_monitor, **settings: Any) -> Iterator[TestClient]:
    app = create_monitor_app(config, monitor_serve_settings(config, **settings), monitor_factory=factory)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.02)
        yield client


def ingest(client: TestClient, items: list[dict[str, Any]], **headers: str) -> httpx.Response:
    return client.post("/v1/ingest", json={"items": items}, headers=headers)


def ingest_stream(client: TestClient, rows: list[dict[str, Any]], size: int = 20) -> list[dict[str, Any]]:
    answers = []
    for i in range(0, len(rows), size):
        response = ingest(client, rows[i : i + size])
        assert response.status_code == 200, response.json()
        answers.append(response.json())
    return answers


# ---- ingest ----------------------------------------------------------------------------------------------


def test_ingest_over_http_is_idempotent_and_answers_each_declined_item(tmp_path: Path) -> None:
    rows = stream_rows()
    with serving(monitor_config(tmp_path)) as client:
        answers = ingest_stream(client, rows)
        assert sum(a["stored"] for a in answers) == len(rows) and not any(a["rejected"] for a in answers)
        alerts = [alert for a in answers for alert in a["alerts"]]
        assert alerts and {a["rule"] for a in alerts} <= {"neg", "vol"}

        # Sent again (a client retrying after a timeout): nothing is stored twice, no alert is raised twice.
        again = ingest(client, rows[:20]).json()
        assert (again["received"], again["stored"], again["duplicates"], again["alerts"]) == (20, 0, 20, [])

        # The stream is at hour 11 and allows no lateness: an hour-old item is declined, said per item, and kept.
        late = {"id": "late", "timestamp": iso_at(T0 + 2 * HOUR), "text": "good, but late"}
        fresh = {"id": "fresh", "timestamp": iso_at(T0 + 11 * HOUR + 3000), "text": "good", "entities": "GLBX; INIT"}
        answer = ingest(client, [fresh, late]).json()
        assert answer["stored"] == 1 and answer["duplicates"] == 0
        [declined] = answer["rejected"]
        assert declined["item"] == 1 and declined["id"] == "late" and declined["reason"].startswith("out of order")

        stats = client.get("/v1/stats").json()
        assert (stats["items"], stats["rejected"], stats["alerts"]) == (len(rows) + 1, 1, len(alerts))
        assert stats["entities"] == 3 and stats["explain"] is False and stats["windows"] == ["1h", "1d"]
    with Store(tmp_path / "monitor.sqlite", readonly=True) as store:
        [kept] = store.rejected()
        assert kept["source"] == "api" and kept["location"].endswith("item 1") and "good, but late" in kept["raw"]
        [item] = store.items(entity="INIT")
        assert item.id == "fresh" and item.source == "api" and item.entities == ("GLBX", "INIT")


def test_bad_items_refuse_the_request_with_a_reason_for_each(tmp_path: Path) -> None:
    ok = {"id": "ok", "timestamp": iso_at(T0), "text": "good"}
    bad = [
        ({"id": "a", "text": "no time"}, "no timestamp (column 'timestamp')"),
        ({"id": "b", "timestamp": "soon", "text": "x"}, "timestamp is not ISO 8601 or epoch seconds"),
        ({"id": "c", "timestamp": 1e300, "text": "x"}, "timestamp out of range"),
        ({"id": "d", "timestamp": iso_at(T0), "text": "   "}, "no text"),
        ({"id": "e", "timestamp": iso_at(T0), "text": 5}, "text is not a string"),
        ({"id": "f", "timestamp": iso_at(T0), "text": "x" * 51}, "'text' has 51 characters; the limit is 50 per text"),
        ({"id": "g", "timestamp": iso_at(T0), "text": "a \ud800 b"}, "'text': not valid Unicode"),
        ({"id": ["h"], "timestamp": iso_at(T0), "text": "x"}, "an id is a string or an integer, not list"),
        ({"id": "i", "timestamp": True, "text": "x"}, "a time is a string or a number, not bool"),
        ({"id": "j", "timestamp": iso_at(T0), "text": "x", "entities": {"ACME": 1}}, "a list of names"),
        ({"id": "k\udfff", "timestamp": iso_at(T0), "text": "x"}, "'id': not valid Unicode"),
    ]
    with serving(monitor_config(tmp_path), max_chars=50, max_texts_per_request=20) as client:
        body = json.dumps({"items": [ok, *(item for item, _ in bad)]})  # json.dumps escapes the lone surrogates
        response = client.post("/v1/ingest", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert [d["loc"] for d in detail] == [["body", "items", i] for i in range(1, len(bad) + 1)]
        for d, (_, reason) in zip(detail, bad, strict=True):
            assert d["type"] == "bad_item" and d["msg"].startswith(f"items[{d['loc'][2]}]: ") and reason in d["msg"]
        assert client.get("/v1/stats").json()["items"] == 0, "a refused request stores nothing"

        # The request's shape: an object with 1..max items, each an object; nothing else.
        for payload, fragment in [
            ({"items": []}, "at least 1 item"),
            ({"items": [ok] * 21}, "at most 20 items"),
            ({"items": [ok, "text"]}, "valid dictionary"),
            ({"items": [ok], "source": "x"}, "Extra inputs are not permitted"),
            ([ok], "valid dictionary"),
        ]:
            response = client.post("/v1/ingest", json=payload)
            assert response.status_code == 422 and fragment in json.dumps(response.json()["detail"]), payload
        response = client.post("/v1/ingest", content=b'{"items": [', headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"
        assert ingest(client, [ok]).json()["stored"] == 1


def test_the_api_key_and_the_body_limit_are_the_classification_servers(tmp_path: Path) -> None:
    item = {"id": "1", "timestamp": iso_at(T0), "text": "good"}
    with serving(monitor_config(tmp_path), api_key=KEY, max_texts_per_request=2, max_chars=10) as client:
        for method, path in [("POST", "/v1/ingest"), ("GET", "/v1/stats"), ("GET", "/v1/entities"), ("GET", "/")]:
            response = client.request(method, path, json={"items": [item]} if method == "POST" else None)
            assert response.status_code == 401 and "API key" in response.json()["detail"], path
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        assert ingest(client, [item], **{"X-API-Key": KEY}).json()["stored"] == 1
        assert ingest(client, [item], Authorization=f"Bearer {KEY}").json()["duplicates"] == 1
        assert ingest(client, [item], Authorization="Bearer wrong-key!").status_code == 401

        limit = client.app.state.monitor.settings.body_limit
        assert limit >= 64 * 1024 + 2 * 10 * 12, "every request the limits allow fits"
        response = client.post("/v1/ingest", content=b"x" * (limit + 1), headers={"X-API-Key": KEY})
        assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"items": [{"text": "'
            for _ in range(limit // 1000 + 2):
                yield b"z" * 1000
            yield b'"}]}'

        headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
        response = client.post("/v1/ingest", content=chunks(), headers=headers)
        assert response.status_code == 413
    with serving(monitor_config(tmp_path), api_key=KEY, public_docs=True) as client:
        page = client.get("/")  # the page is open; its calls still need the key
        assert page.status_code == 200 and client.get("/v1/stats").status_code == 401


def test_ingest_before_the_model_is_ready_is_503_and_a_failed_start_says_so(tmp_path: Path) -> None:
    def broken(config: MonitorConfig, store: Store) -> Monitor:
        raise RuntimeError("no model here")

    config = monitor_config(tmp_path)
    app = create_monitor_app(config, monitor_serve_settings(config), monitor_factory=broken)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/ready").json() == {"status": "failed"}
        response = ingest(client, [{"timestamp": iso_at(T0), "text": "good"}])
        assert response.status_code == 503 and "failed to start" in response.json()["detail"]
        # The dashboard still reads what is stored.
        assert client.get("/v1/stats").json()["status"] == "failed"


# ---- the dashboard's queries -------------------------------------------------------------------------------


def test_the_queries_the_dashboard_reads(tmp_path: Path) -> None:
    config = monitor_config(tmp_path, smoothing=0.5)
    with serving(config) as client:
        ingest_stream(client, stream_rows())
        overview = client.get("/v1/entities", params={"window": "1h", "points": 6}).json()
        assert overview["window"] == "1h" and len(overview["starts"]) == 6
        assert overview["starts"][-1] == iso_at(T0 + 11 * HOUR) and overview["total_entities"] == 2
        rows = {row["entity"]: row for row in overview["entities"]}
        assert [row["entity"] for row in overview["entities"]] == [OVERALL, "ACME", "GLBX"]
        with Store(tmp_path / "monitor.sqlite", readonly=True) as store:
            for entity in (OVERALL, "ACME", "GLBX"):
                windows = series(store, entity, HOUR, alpha=0.5)[-6:]
                spark = rows[entity]["sparkline"]
                assert spark["volume"] == [w.volume for w in windows]
                means = [None if w.mean_signed is None else pytest.approx(w.mean_signed, abs=1e-6) for w in windows]
                assert spark["mean_signed"] == means
                assert rows[entity]["volume"] == sum(w.volume for w in series(store, entity, HOUR, alpha=0.5))
            assert rows["ACME"]["alerts"] == len(store.alerts(entity="ACME", limit=1000))

            answer = client.get("/v1/series", params={"entity": "ACME", "window": "60m"}).json()
            assert answer["window"] == "1h", "a window is known by its length"
            expected = [w.to_dict() for w in series(store, "ACME", HOUR, alpha=0.5)]
            _same_windows(answer["series"], expected)
            assert {a["id"] for a in answer["alerts"]} == {a.id for a in store.alerts(entity="ACME", limit=1000)}
            day = client.get("/v1/series", params={"entity": OVERALL, "window": "1d", "points": 1}).json()
            assert [w["volume"] for w in day["series"]] == [len(stream_rows())]

            listed = client.get("/v1/alerts", params={"limit": 3}).json()["alerts"]
            assert [a["id"] for a in listed] == [a.id for a in store.alerts(limit=3)]
            only = client.get("/v1/alerts", params={"entity": "ACME", "rule": "neg"}).json()["alerts"]
            assert only and all(a["entity"] == "ACME" and a["rule"] == "neg" for a in only)

            drill = client.get(f"/v1/alerts/{only[0]['id']}/items", params={"limit": 2}).json()
            assert drill["alert"]["id"] == only[0]["id"] and len(drill["items"]) == 2
            assert all(only[0]["window_start"] <= i["ts"] < only[0]["window_end"] for i in drill["items"])
            assert drill["items"][0]["sentiment"] == "negative" and "ACME" in drill["items"][0]["entities"]

        # Bad queries: said, never a 500.
        for path, params, status, fragment in [
            ("/v1/series", {"entity": "NOPE"}, 404, "no items for entity 'NOPE'"),
            ("/v1/series", {"entity": "ACME", "window": "2h"}, 422, "not one of the windows (1h, 1d)"),
            ("/v1/series", {"entity": "ACME", "window": "soon"}, 422, "not one of the windows"),
            ("/v1/series", {}, 422, "Field required"),
            ("/v1/entities", {"points": 0}, 422, "greater than or equal to 1"),
            ("/v1/entities", {"limit": 10**6}, 422, "less than or equal to 500"),
            ("/v1/alerts/999999/items", {}, 404, "no alert 999999"),
            ("/v1/alerts/x/items", {}, 422, "valid integer"),
            ("/v1/alerts/1/items", {"order": "random"}, 422, "most_negative"),
            ("/v1/explain", {"item": "0-0"}, 501, "no model to explain"),
        ]:
            response = client.get(path, params=params)
            assert response.status_code == status and fragment in json.dumps(response.json()), (path, params)


def _same_windows(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """The series read from the window sums is the core's, read from the items (sums may differ in the last bit)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key, value in b.items():
            assert a[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_the_dashboard_page_is_self_contained(tmp_path: Path) -> None:
    with serving(monitor_config(tmp_path)) as client:
        page = client.get("/")
    assert page.status_code == 200 and "tuneforge monitor" in page.text
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
    # Nothing from elsewhere: no script or style file, and the only URL is SVG's namespace.
    assert "<script src" not in page.text and "<link" not in page.text
    assert page.text.replace("http://www.w3.org/2000/svg", "").count("://") == 0


# ---- the window sums ---------------------------------------------------------------------------------------


def test_window_sums_equal_the_items_and_an_older_store_gets_them(tmp_path: Path) -> None:
    monitor = keyword_monitor(monitor_config(tmp_path), Store(tmp_path / "monitor.sqlite"))
    rows = stream_rows()
    for i in range(0, len(rows), 7):
        monitor.ingest([Record(row, f"row {j}") for j, row in enumerate(rows[i : i + 7], start=i)])
    monitor.ingest([Record({"id": "x", "timestamp": T0 + 30 * HOUR, "text": "bad", "entities": ["GLBX"]}, "x")])
    store = monitor.store

    def both(window: float, **bounds: float) -> None:
        fast = views.window_counts(store, window, **bounds)
        slow = store.window_counts(window, **bounds)
        assert [(c.entity, c.start, c.volume, c.negative, c.positive) for c in fast] == [
            (c.entity, c.start, c.volume, c.negative, c.positive) for c in slow
        ]
        assert [c.signed_sum for c in fast] == pytest.approx([c.signed_sum for c in slow])

    assert rollup.window_sums(store.conn, HOUR, entities=None, start=None, end=None) is not None
    for window in (60.0, 900.0, HOUR, 6 * HOUR, 86400.0, 7 * 86400.0):
        both(window)
        both(window, start=T0 + 6 * HOUR, end=T0 + 2 * 86400)
    assert rollup.window_sums(store.conn, 90.0, entities=None, start=None, end=None) is None, "not whole minutes"
    assert rollup.window_sums(store.conn, HOUR, entities=None, start=T0 + 1, end=None) is None, "a bound mid-bucket"
    both(90.0)
    expected = [(s.entity, s.volume, s.first_ts, s.last_ts) for s in views.entity_summaries(store)]
    assert expected[0][:2] == (OVERALL, len(rows) + 1) and expected[1][0] == "ACME"
    monitor.close()

    # A store written before the sums existed: a reader reads the items, and the next writer adds them up.
    with sqlite3.connect(tmp_path / "monitor.sqlite") as conn:
        conn.execute("DROP TABLE rollup")
        conn.execute("DELETE FROM meta WHERE key = 'rollup'")
    with Store(tmp_path / "monitor.sqlite", readonly=True) as reader:
        assert not rollup.ready(reader.conn)
        assert [(s.entity, s.volume, s.first_ts, s.last_ts) for s in views.entity_summaries(reader)] == expected
        assert views.stats(reader)["items"] == len(rows) + 1
    Store(tmp_path / "monitor.sqlite").close()
    with Store(tmp_path / "monitor.sqlite", readonly=True) as reader:
        assert rollup.ready(reader.conn)
        assert [(s.entity, s.volume, s.first_ts, s.last_ts) for s in views.entity_summaries(reader)] == expected
        store = reader
        both(HOUR)
        both(86400.0)


# ---- explanations, the source, the command -------------------------------------------------------------------


def test_a_stored_text_is_explained_with_the_run(trained_tiny_run: Path, tmp_path: Path) -> None:
    config = monitor_config(tmp_path, scoring={"run": str(trained_tiny_run), "labels": TINY_ROLES})
    long_text = " ".join(["word"] * 200)
    with serving(config, factory=lambda c, s: Monitor(c, store=s, sinks=Sinks([]))) as client:
        items = [
            {"id": "n1", "timestamp": iso_at(T0), "text": "the service was terrible and slow", "entities": ["ACME"]},
            {"id": "n2", "timestamp": iso_at(T0 + 60), "text": long_text},
        ]
        assert ingest(client, items).json()["stored"] == 2
        assert client.get("/v1/stats").json()["explain"] is True
        answer = client.get("/v1/explain", params={"item": "n1"})
        assert answer.status_code == 200, answer.json()
        body = answer.json()
        with Store(tmp_path / "monitor.sqlite", readonly=True) as store:
            [stored] = store.items(entity="ACME")
        assert body["item"] == "n1" and body["label"] == stored.label and body["method"] == "occlusion"
        assert [w["word"] for w in body["words"]] == items[0]["text"].split()
        assert body["probability"] == pytest.approx(stored.probability, abs=1e-3)
        response = client.get("/v1/explain", params={"item": "n2"})
        assert response.status_code == 422 and "the limit is 128" in response.json()["detail"][0]["msg"]
        assert client.get("/v1/explain", params={"item": "nope"}).status_code == 404


def test_serve_reads_the_configured_file_source_beside_the_api(tmp_path: Path) -> None:
    rows = stream_rows()
    write_jsonl(tmp_path / "news.jsonl", rows)
    config = monitor_config(tmp_path, source={"type": "file", "path": str(tmp_path / "news.jsonl"), "lateness": "0s"})
    app = create_monitor_app(config, monitor_serve_settings(config), monitor_factory=keyword_monitor)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/v1/stats").json()["items"] < len(rows):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        item = {"id": "api-1", "timestamp": iso_at(T0 + 12 * HOUR), "text": "good", "entities": ["ACME"]}
        assert ingest(client, [item]).json()["stored"] == 1
    with Store(tmp_path / "monitor.sqlite", readonly=True) as store:
        assert store.item_count() == len(rows) + 1
        assert store.stats()["offsets"] == {str(tmp_path / "news.jsonl"): (tmp_path / "news.jsonl").stat().st_size}


def test_monitor_serve_runs_as_a_command_and_stops_on_sigterm(trained_tiny_run: Path, tmp_path: Path) -> None:
    raw = raw_config(tmp_path, run=trained_tiny_run, **SECTIONS)
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["monitor", "serve", str(tmp_path / "monitor.yaml"), "--max-items", "0"]) == 2
    assert main(["monitor", "serve", str(tmp_path / "monitor.yaml"), "--max-queue", "3"]) == 2
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "monitor", "serve", str(tmp_path / "monitor.yaml"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TUNEFORGE_API_KEY": KEY},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_process_ready(process, url, timeout=120)
        items = [{"id": str(i), "timestamp": iso_at(T0 + i * 60), "text": f"ACME news {i}"} for i in range(5)]
        response = httpx.post(f"{url}/v1/ingest", json={"items": items}, headers={"X-API-Key": KEY}, timeout=60)
        assert response.status_code == 200 and response.json()["stored"] == 5
        assert httpx.get(f"{url}/v1/stats").status_code == 401
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # uvicorn re-raises the signal after its graceful shutdown, as a process stopped by SIGTERM should.
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "monitor: dashboard" in stderr and "Application shutdown complete" in stderr and "Traceback" not in stderr
    with Store(tmp_path / "monitor.sqlite", readonly=True) as store:
        assert store.item_count() == 5 and [e.entity for e in store.entities()] == ["ACME"]
