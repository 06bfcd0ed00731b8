"""``tuneforge monitor serve CONFIG``: the monitor behind HTTP. ``POST /v1/ingest`` takes batches of items, the
configured file source (if any) is read as ``monitor run`` reads it, and a dashboard (``GET /``) with its
read API shows the entities, their series with alerts marked, the alerts and the texts behind each one.

The pieces of the classification server are reused as they are: its settings (:class:`ServeSettings`: API
key, body size limit, per-text limit, CORS, root path), its middleware (request id, the key, 413 before a
large body is read), its error shapes (JSON ``{"detail", "request_id"}``, 422 with where and what) and its
explanation lane (occlusion in small chunks, one explanation at a time, 503 beyond a few waiting).

One process writes the store: items arriving over HTTP and from the source go through one
:class:`~tuneforge.apps.monitor.runner.Monitor` (thread-safe; a batch is one transaction). Reads never touch
its connection: each worker thread has a read-only one, so the dashboard never waits for an ingest.
"""

# No `from __future__ import annotations`: FastAPI reads the ingest route's body type when the route is
# declared, and that type is made per app (its limits come from the settings).

import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from starlette.concurrency import run_in_threadpool

from tuneforge.apps.monitor import views
from tuneforge.apps.monitor.config import ColumnsConfig, MonitorConfig, parse_duration
from tuneforge.apps.monitor.items import BadItem, Record, to_item
from tuneforge.apps.monitor.runner import Monitor, open_source
from tuneforge.apps.monitor.score import label_roles
from tuneforge.apps.monitor.store import Store
from tuneforge.errors import TuneforgeError
from tuneforge.explain.core import explain_occlusion, label_index, words_to_explain
from tuneforge.explain.occlusion import occlusion_texts
from tuneforge.rundir import open_run_dir
from tuneforge.serve.app import (
    ApiError,
    install_error_handlers,
    install_middleware,
    self_contained_page,
    unprocessable,
)
from tuneforge.serve.batcher import BatcherClosedError, DynamicBatcher, InferenceTimeoutError, QueueTimeoutError
from tuneforge.serve.explainer import EXPLAIN_CHUNK, ExplainBusyError, ExplainLane
from tuneforge.serve.metrics import ServeMetrics
from tuneforge.serve.middleware import latency_ms, request_id_of
from tuneforge.serve.server import announce, base_url, check_port, configure_logging, serve_app
from tuneforge.serve.settings import ServeSettings

logger = logging.getLogger("tuneforge.serve.monitor")

MonitorFactory = Callable[[MonitorConfig, Store], Monitor]
# Bounds of one item of an ingest request beyond its text (the body limit bounds everything together).
MAX_ID_CHARS = 256
MAX_ENTITIES = 100
MAX_ENTITY_CHARS = 200
# Bytes an item may take in a body besides its text: id, timestamp, entities, a few other fields.
_ITEM_OVERHEAD_BYTES = 4096
# Windows a series or a sparkline answers at most; entities a list shows at most.
MAX_POINTS = 5000
MAX_ENTITIES_LISTED = 500
MAX_ALERTS_LISTED = 1000
MAX_TEXTS_LISTED = 200
_WARNINGS_LOGGED = 20


def monitor_serve_settings(config: MonitorConfig, **options: Any) -> ServeSettings:
    """:class:`ServeSettings` for the monitor: ``max_texts_per_request`` is items per ingest request,
    ``max_chars`` characters per text, ``max_queue`` items waiting to be ingested; the body limit leaves room
    for each item's other fields."""
    settings = ServeSettings(run_dir=config.scoring.run, **options)
    if settings.max_body_bytes is None:
        per_item = settings.max_chars * 12 + _ITEM_OVERHEAD_BYTES  # 12: an escaped surrogate pair per character
        settings = replace(settings, max_body_bytes=64 * 1024 + settings.max_texts_per_request * per_item)
    return settings


# ---- the ingest request -------------------------------------------------------------------------------------


class IngestRequest(BaseModel):
    """A batch of items, each an object with the configured columns."""

    model_config = ConfigDict(strict=True, extra="forbid")

    items: list[dict[str, Any]]


def ingest_request_model(columns: ColumnsConfig, *, max_items: int, max_chars: int) -> type[IngestRequest]:
    """:class:`IngestRequest` with the server's limits in its validation and its schema."""
    keys = [
        f"'{columns.text}' (the text, at most {max_chars} characters)",
        f"'{columns.timestamp}' (ISO 8601 or epoch seconds; without an offset: source.timezone)",
    ]
    if columns.id:
        keys.append(
            f"'{columns.id}' (optional: a string or integer; without one the item is keyed by a hash "
            "of its time and text)"
        )
    if columns.entities:
        keys.append(f"'{columns.entities}' (optional: a list of tickers, or one string split on ; , |)")
    example = {columns.timestamp: "2025-03-03T09:30:00Z", columns.text: "Acme beats estimates"}
    if columns.id:
        example = {columns.id: "news-1", **example}

    class LimitedIngestRequest(IngestRequest):
        model_config = ConfigDict(title="IngestRequest", json_schema_extra={"examples": [{"items": [example]}]})

        items: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=max_items)] = Field(
            description=f"1 to {max_items} items, each an object with {', '.join(keys)}"
        )

    return LimitedIngestRequest


def _lone_surrogate(value: Any, where: str) -> str | None:
    """Where a string of ``value`` cannot be stored (a lone surrogate such as \\ud800, which JSON can spell)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where}: not valid Unicode (a lone surrogate such as \\ud800): send UTF-8 text"
        return None
    if isinstance(value, list):
        return next((found for v in value if (found := _lone_surrogate(v, where))), None)
    if isinstance(value, dict):
        return next((found for k, v in value.items() if (found := _lone_surrogate([k, v], f"{where}.{k}"))), None)
    return None


def check_item(fields: dict[str, Any], columns: ColumnsConfig, max_chars: int) -> str | None:
    """Why an item of an ingest request cannot be an item (beyond what :func:`to_item` says), or None."""
    for key, value in fields.items():
        if found := _lone_surrogate([key, value], f"'{key}'"):
            return found
    text = fields.get(columns.text)
    if isinstance(text, str) and len(text) > max_chars:
        return f"'{columns.text}' has {len(text)} characters; the limit is {max_chars} per text"
    if columns.id and fields.get(columns.id) is not None:
        value = fields[columns.id]
        if isinstance(value, bool) or not isinstance(value, str | int):
            return f"'{columns.id}': an id is a string or an integer, not {type(value).__name__}"
        if len(str(value)) > MAX_ID_CHARS:
            return f"'{columns.id}': {len(str(value))} characters; the limit is {MAX_ID_CHARS}"
    stamp = fields.get(columns.timestamp)
    if isinstance(stamp, bool) or not isinstance(stamp, str | int | float | None):
        return f"'{columns.timestamp}': a time is a string or a number, not {type(stamp).__name__}"
    if columns.entities and fields.get(columns.entities) is not None:
        value = fields[columns.entities]
        names = value if isinstance(value, list) else [value]
        if not isinstance(value, str | list) or any(isinstance(n, bool) or not isinstance(n, str | int) for n in names):
            return f"'{columns.entities}': a list of names (strings) or one string split on ; , |"
    return None


# ---- the app's state ---------------------------------------------------------------------------------------


class Readers:
    """A read-only store connection per worker thread: reads never queue behind the writer or each other."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self._local = threading.local()
        self._opened: list[Store] = []
        self._lock = threading.Lock()

    def get(self) -> Store:
        store = getattr(self._local, "store", None)
        if store is None:
            store = Store(self.path, readonly=True)
            self._local.store = store
            with self._lock:
                self._opened.append(store)
        return store

    def close(self) -> None:
        with self._lock:
            for store in self._opened:
                store.close()
            self._opened.clear()


class MonitorState:
    """Everything the routes share; one per app."""

    def __init__(self, config: MonitorConfig, settings: ServeSettings, factory: MonitorFactory, source: bool) -> None:
        self.config = config
        self.settings = settings
        self.factory = factory
        self.read_source = source
        self.metrics = ServeMetrics()
        self.readers = Readers(config.store.path)
        self.monitor: Monitor | None = None
        self.load_error: str | None = None
        self.shutting_down = False
        self.stop_source = threading.Event()
        self.items_waiting = 0  # items of ingest requests accepted and not yet stored
        self.batcher: DynamicBatcher | None = None
        self.explainer: ExplainLane | None = None
        self.windows = {w: parse_duration(w) for w in config.windows}

    @property
    def predictor(self) -> Any:
        """The model behind the scores, when there is one to explain (not a test's keyword scorer)."""
        scorer = getattr(self.monitor, "scorer", None)
        predictor = getattr(scorer, "predictor", None)
        return predictor if hasattr(predictor, "predict_proba") and hasattr(predictor, "labels") else None

    @property
    def status(self) -> str:
        if self.shutting_down:
            return "shutting down"
        if self.load_error is not None:
            return "failed"
        return "loading" if self.monitor is None else "ready"

    def explain_probabilities(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.predictor.predict_proba(texts), dtype=np.float32)

    def load(self, writer: Store) -> None:
        """Background thread: load the scorer, then (unless told not to) read the configured source."""
        try:
            monitor = self.factory(self.config, writer)
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, TuneforgeError):
                logger.error("the monitor could not start: %s", message)
            else:
                logger.exception("the monitor could not start")
            self.load_error = message
            writer.close()
            return
        self.monitor = monitor
        self.metrics.model_ready.set(1)
        logger.info("monitor ready: %s -> %s", self.config.scoring.run, self.config.store.path)
        if self.read_source and not self.stop_source.is_set():
            try:
                self.consume(monitor)
            except Exception:  # the API goes on; the log says why the source stopped
                logger.exception("source: reading stopped")

    def consume(self, monitor: Monitor) -> None:
        if self.config.source.type == "stdin":
            logger.info("source: stdin is not read by monitor serve; send items to POST /v1/ingest")
            return
        records, name = open_source(self.config, monitor.store, stop=self.stop_source.is_set, warn=_warner())
        logger.info("source: reading %s", name)
        report = monitor.consume(_until(records, self.stop_source.is_set), source=name)
        logger.info("source %s: %s", "stopped" if self.stop_source.is_set() else "done", report.summary())


def _until(records: Iterable[Record | None], stop: Callable[[], bool]) -> Iterator[Record | None]:
    for record in records:
        if stop():
            return
        yield record


def _warner() -> Callable[[str], None]:
    shown = [0]

    def warn(message: str) -> None:
        shown[0] += 1
        if shown[0] <= _WARNINGS_LOGGED:
            logger.warning("%s", message)
        elif shown[0] == _WARNINGS_LOGGED + 1:
            logger.warning("more warnings; GET /v1/stats counts the rejected records")

    return warn


def default_monitor(config: MonitorConfig, store: Store) -> Monitor:
    return Monitor(config, store=store, warn=_warner())


def _not_ready(state: MonitorState) -> ApiError:
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    status = state.status
    if status == "shutting down":
        return ApiError(503, "the server is shutting down", retry)
    if status == "failed":
        return ApiError(503, "the monitor failed to start; see the server log")
    return ApiError(503, "the model is still loading; retry shortly", retry)


def _dashboard_html() -> str:
    return (files("tuneforge.apps.monitor") / "static" / "dashboard.html").read_text(encoding="utf-8")


# ---- the app -----------------------------------------------------------------------------------------------


def create_monitor_app(
    config: MonitorConfig,
    settings: ServeSettings,
    *,
    monitor_factory: MonitorFactory | None = None,
    read_source: bool = True,
) -> FastAPI:
    """The ASGI app. ``monitor_factory`` builds the monitor on the writer's store (tests give a scorer of their
    own); ``read_source``: also read the configured file source, as ``monitor run`` does."""
    settings.validate()
    state = MonitorState(config, settings, monitor_factory or default_monitor, read_source)
    columns = config.source.columns

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        writer = await run_in_threadpool(Store, config.store.path)  # made here, so readers find the file
        state.batcher = DynamicBatcher(
            state.explain_probabilities, max_batch_size=EXPLAIN_CHUNK, max_wait_s=0.0, max_queue=settings.max_queue
        )
        state.batcher.start()
        state.explainer = ExplainLane()
        loader = threading.Thread(target=state.load, args=(writer,), name="tuneforge-monitor", daemon=True)
        loader.start()
        try:
            yield
        finally:
            state.shutting_down = True
            state.stop_source.set()
            state.metrics.model_ready.set(0)
            await state.batcher.close(timeout_s=settings.drain_timeout_s)
            # The source commits what it holds; open ingest requests have finished (uvicorn waited for them).
            await run_in_threadpool(loader.join, settings.drain_timeout_s)
            if state.monitor is not None:
                await run_in_threadpool(state.monitor.close)
            state.readers.close()
            state.metrics.process_exiting()

    app = FastAPI(
        title="tuneforge monitor",
        description="Financial sentiment monitoring: ingest news items, read the series, alerts and texts.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's page loads Swagger UI from a CDN; the dashboard must work offline
        redoc_url=None,
    )
    app.state.monitor = state

    install_error_handlers(app)

    def window_of(window: str | None) -> tuple[str, float]:
        if window is None:
            name = config.windows[0]
            return name, state.windows[name]
        try:
            seconds = parse_duration(window)
        except ValueError:
            seconds = math.nan
        name = next((name for name, size in state.windows.items() if size == seconds), None)
        if name is None:
            raise unprocessable(
                ["query", "window"],
                f"'window': {window!r} is not one of the windows ({', '.join(config.windows)})",
                "unknown_window",
            )
        return name, seconds

    # ---- ingest ------------------------------------------------------------------------------------------

    request_model = ingest_request_model(
        columns, max_items=settings.max_texts_per_request, max_chars=settings.max_chars
    )

    @app.post("/v1/ingest", summary="Store a batch of items: scored, deduplicated by id, judged by the rules")
    async def ingest(body: request_model, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """Idempotent: an item whose id (or time and text) is stored already is counted as a duplicate, so a
        request that failed or timed out can be sent again. A bad item refuses the whole request (422, each bad
        item with its reason); items the monitor's time policy declines (too late, too far ahead of the clock)
        are answered in ``rejected`` and kept in the store's rejected records."""
        rid = request_id_of(request)
        monitor = state.monitor
        if monitor is None or state.shutting_down:
            raise _not_ready(state)
        items: list[dict[str, Any]] = body.items
        errors, records = [], []
        for i, fields in enumerate(items):
            where = f"request {rid} item {i}"
            record = Record(fields, where, raw=json.dumps(fields)[:2000])
            reason = check_item(fields, columns, settings.max_chars)
            if reason is None:
                try:
                    to_item(record, columns, monitor.zone, monitor.matcher)
                except BadItem as exc:
                    reason = str(exc)
            if reason is not None:
                errors.append({"loc": ["body", "items", i], "msg": f"items[{i}]: {reason}", "type": "bad_item"})
            records.append(record)
        if errors:
            raise ApiError(422, errors)
        if state.items_waiting + len(records) > settings.max_queue:
            retry = {"Retry-After": str(settings.retry_after_s)}
            raise ApiError(503, "the monitor is busy (too many items waiting to be stored); retry shortly", retry)
        state.items_waiting += len(records)
        try:
            # Not cancelled when the client leaves: the batch is stored (or not) whole, and sending it again
            # stores nothing twice.
            report = await run_in_threadpool(monitor.ingest, records, source="api")
        finally:
            state.items_waiting -= len(records)
        index = {record.where: i for i, record in enumerate(records)}
        return JSONResponse(
            {
                "request_id": rid,
                "received": report.received,
                "stored": report.stored,
                "duplicates": report.duplicates,
                "rejected": [{"item": index.get(r.where), "id": r.id, "reason": r.reason} for r in report.rejections],
                "alerts": [alert.to_dict() for alert in report.alerts],
                "latency_ms": latency_ms(request),
            }
        )

    # ---- reads -------------------------------------------------------------------------------------------

    @app.get("/v1/stats", summary="Counts, the time range, the windows and rules, what the server can do")
    def stats() -> JSONResponse:
        return JSONResponse(
            {
                **views.stats(state.readers.get()),
                "status": state.status,
                "windows": config.windows,
                "rules": [
                    {"name": rule.name, "type": rule.type, "window": rule.window, "field": rule.field}
                    for rule in config.rules
                ],
                "explain": state.predictor is not None,
                "limits": {"max_items": settings.max_texts_per_request, "max_chars": settings.max_chars},
            }
        )

    @app.get("/v1/entities", summary="The busiest entities (and '*', all items) with a sparkline each")
    def entities(
        window: Annotated[str | None, Query(description="one of the config's windows; default: the first")] = None,
        points: Annotated[int, Query(ge=1, le=MAX_POINTS, description="windows per sparkline")] = 24,
        limit: Annotated[int, Query(ge=1, le=MAX_ENTITIES_LISTED, description="entities at most")] = 50,
    ) -> JSONResponse:
        name, seconds = window_of(window)
        overview = views.overview(state.readers.get(), seconds, points=points, limit=limit)
        return JSONResponse({"window": name, **overview})

    @app.get("/v1/series", summary="One entity's windows: volume, shares, mean signed sentiment, index; its alerts")
    def series(
        entity: Annotated[str, Query(min_length=1, max_length=MAX_ENTITY_CHARS, description="'*': all items")],
        window: Annotated[str | None, Query(description="one of the config's windows; default: the first")] = None,
        points: Annotated[int, Query(ge=1, le=MAX_POINTS, description="the last windows at most")] = 500,
    ) -> JSONResponse:
        name, seconds = window_of(window)
        store = state.readers.get()
        windows = views.series(store, entity, seconds, alpha=config.smoothing, points=points)
        if not windows:
            raise ApiError(404, f"no items for entity {entity!r}")
        # Alerts whose window overlaps the series (a day's alert may start before the first hour shown).
        longest = max(state.windows.values())
        alerts = store.alerts(entity=entity, start=windows[0].start - longest, limit=MAX_ALERTS_LISTED)
        shown = [a for a in alerts if a.window_end > windows[0].start]
        return JSONResponse(
            {
                "entity": entity,
                "window": name,
                "series": [w.to_dict() for w in windows],
                "alerts": [a.to_dict() for a in shown],
            }
        )

    @app.get("/v1/alerts", summary="Alerts, newest window first")
    def alerts(
        entity: Annotated[str | None, Query(max_length=MAX_ENTITY_CHARS, description="'*': the overall series")] = None,
        rule: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_ALERTS_LISTED)] = 100,
    ) -> JSONResponse:
        found = state.readers.get().alerts(entity=entity, rule=rule, limit=limit)
        return JSONResponse({"alerts": [a.to_dict() for a in found]})

    @app.get(
        "/v1/alerts/{alert_id}/items", summary="An alert and the texts behind it (its entity's items in its window)"
    )
    def alert_items(
        alert_id: int,
        limit: Annotated[int, Query(ge=1, le=MAX_TEXTS_LISTED)] = 20,
        order: Literal["most_negative", "most_positive", "newest", "oldest"] = "most_negative",
    ) -> JSONResponse:
        store = state.readers.get()
        alert = store.alert(alert_id)
        if alert is None:
            raise ApiError(404, f"no alert {alert_id}")
        found = store.items(
            entity=alert.entity, start=alert.window_start, end=alert.window_end, order=order, limit=limit
        )
        return JSONResponse({"alert": alert.to_dict(), "items": [item.to_dict() for item in found]})

    @app.get("/v1/explain", summary="Which words of a stored item made the model give its label (occlusion)")
    async def explain(
        request: Request, item: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS, description="item id")]
    ) -> JSONResponse:
        if state.monitor is None or state.shutting_down or state.batcher is None or state.explainer is None:
            raise _not_ready(state)
        predictor = state.predictor
        if predictor is None:
            raise ApiError(501, "this monitor's scorer has no model to explain")
        found = await run_in_threadpool(lambda: views.item_text(state.readers.get(), item))
        if found is None:
            raise ApiError(404, f"no item {item!r}")
        try:
            words = words_to_explain(found.text)
            index = label_index(predictor.labels, found.label)
        except TuneforgeError as exc:
            raise unprocessable(["query", "item"], str(exc).removeprefix("explain: "), "cannot_explain") from None
        texts = occlusion_texts(found.text, words)
        try:
            probabilities = await state.explainer.probabilities(
                state.batcher, texts, timeout_s=settings.request_timeout_s
            )
        except ExplainBusyError:
            retry = {"Retry-After": str(settings.retry_after_s)}
            raise ApiError(503, "the server is busy explaining other texts; retry shortly", retry) from None
        except BatcherClosedError:
            raise _not_ready(state) from None
        except QueueTimeoutError as exc:
            retry = {"Retry-After": str(settings.retry_after_s)}
            raise ApiError(503, f"the server is overloaded: the explanation {exc}; retry shortly", retry) from None
        except InferenceTimeoutError as exc:
            raise ApiError(504, str(exc)) from None
        explanation = explain_occlusion(predictor, found.text, words, index, probabilities)
        return JSONResponse({"item": found.id, "text": found.text, **explanation.to_dict()})

    # ---- service -----------------------------------------------------------------------------------------

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and ingest is accepted")
    async def ready() -> JSONResponse:
        status = state.status
        code = 200 if status == "ready" else 503
        headers = {} if code == 200 else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse({"status": status}, status_code=code, headers=headers)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        content, content_type = state.metrics.render()
        return Response(content, media_type=content_type)

    page = _dashboard_html()

    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return self_contained_page(page)  # inline script and style, SVG charts

    install_middleware(app, settings, state.metrics)
    return app


# ---- running it ---------------------------------------------------------------------------------------------


def prepare(config: MonitorConfig, settings: ServeSettings) -> None:
    """What can be checked before starting, so that a bad run, store or port is one line and exit 2."""
    settings.validate()
    run = open_run_dir(config.scoring.run)
    label_roles(run.labels(), config.scoring.labels, run.path)
    check_port(settings.host, settings.port)
    Store(config.store.path).close()  # made (or checked, and its window sums built) before clients come


def run_monitor_server(
    config: MonitorConfig, settings: ServeSettings, *, read_source: bool = True, console: Console | None = None
) -> int:
    prepare(config, settings)
    configure_logging(settings.log_level)
    where = base_url(settings)
    source = config.source
    reading = f", reading {source.path}" if read_source and source.type != "stdin" else ""
    announce(
        settings,
        f"monitor: dashboard {where}/, ingest POST {where}/v1/ingest{reading}; store {config.store.path}"
        f"{' (API key required)' if settings.api_key else ''}",
        console,
    )
    return serve_app(create_monitor_app(config, settings, read_source=read_source), settings)
