"""The HTTP app: classification with dynamic batching, health, readiness, metrics, playground, docs.

The model loads in a background thread after startup, so the process answers /health at once and
/ready says 503 until the model is warm. Every response carries the request id (``X-Request-ID``,
taken from the request or generated); errors are JSON ``{"detail", "request_id"}`` and never
contain a stack trace.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import tuneforge
from tuneforge.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from tuneforge.serve.metrics import ServeMetrics
from tuneforge.serve.middleware import INTERNAL_ERROR, RequestContextMiddleware, error_response, request_id_of
from tuneforge.serve.model import ServableModel, describe_model, load_predictor
from tuneforge.serve.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, ModelInfo
from tuneforge.serve.settings import ServeSettings

logger = logging.getLogger("tuneforge.serve")

ModelFactory = Callable[[ServeSettings], ServableModel]


class ApiError(Exception):
    """An error answer: status, a message for the client, optional headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class ServeState:
    """Everything the routes share; one per app."""

    def __init__(self, settings: ServeSettings, model_factory: ModelFactory) -> None:
        self.settings = settings
        self.model_factory = model_factory
        self.metrics = ServeMetrics()
        self.model: ServableModel | None = None
        self.info: dict[str, Any] | None = None
        self.load_error: str | None = None
        self.batcher: DynamicBatcher | None = None
        self.shutting_down = False

    @property
    def ready(self) -> bool:
        return self.model is not None and not self.shutting_down

    def infer(self, texts: list[str]) -> np.ndarray:
        assert self.model is not None  # submit() is only reached once the model is ready
        return np.asarray(self.model.predict_proba(texts), dtype=np.float32)

    def load(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a background thread: load, warm up, then hand the model to the event loop."""
        try:
            model = self.model_factory(self.settings)
            # The first call pays for lazy initialisation (kernels, allocator); do it before /ready.
            model.predict_proba(["warm up"])
            info = describe_model(self.settings, model)
        except Exception as exc:
            logger.exception("the model could not be loaded")
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._call_in_loop(loop, self._failed, message)
            return
        self._call_in_loop(loop, self._loaded, model, info)

    @staticmethod
    def _call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the server stopped while the model was loading

    def _loaded(self, model: ServableModel, info: dict[str, Any]) -> None:
        self.info = info
        self.model = model
        self.metrics.model_ready.set(1)
        logger.info("model ready: %s (%s, %d labels)", info["run_dir"], info["form"], info["num_labels"])

    def _failed(self, message: str) -> None:
        self.load_error = message


def _not_ready(state: ServeState) -> ApiError:
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    if state.shutting_down:
        return ApiError(503, "the server is shutting down", retry)
    if state.load_error is not None:
        # The reason (often a server path) goes to the server log, not to clients.
        return ApiError(503, "the model failed to load; see the server log")
    return ApiError(503, "the model is still loading; retry shortly", retry)


def _rank(probabilities: np.ndarray, labels: list[str], top_k: int) -> list[list[tuple[str, float]]]:
    k = min(top_k, len(labels))
    # argsort of the negated row: highest first; stable, so ties keep label order.
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(labels[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order, strict=True)]


def _playground_html() -> str:
    return (files("tuneforge.serve") / "static" / "playground.html").read_text(encoding="utf-8")


def _swagger_static_dir() -> str | None:
    # swagger-ui-py ships Swagger UI's files; served from here, /docs works without internet.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    if (folder / "swagger-ui-bundle.js").is_file() and (folder / "swagger-ui.css").is_file():
        return str(folder)
    return None


def create_app(settings: ServeSettings, *, model_factory: ModelFactory | None = None) -> FastAPI:
    """The ASGI app for ``settings``; ``model_factory`` replaces loading the run directory (tests)."""
    settings.validate()
    state = ServeState(settings, model_factory or load_predictor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher = DynamicBatcher(
            state.infer,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            metrics=state.metrics,
        )
        state.batcher.start()
        # A daemon thread: a server stopped while loading must not wait for the load to finish.
        loader = threading.Thread(
            target=state.load, args=(asyncio.get_running_loop(),), name="tuneforge-load", daemon=True
        )
        loader.start()
        try:
            yield
        finally:
            # uvicorn has already stopped accepting connections and waited for open requests; this
            # finishes whatever is still queued before the process ends.
            state.shutting_down = True
            state.metrics.model_ready.set(0)
            await state.batcher.close(timeout_s=settings.drain_timeout_s)

    swagger_dir = _swagger_static_dir()
    app = FastAPI(
        title="tuneforge",
        version=tuneforge.__version__,
        description="Text classification with a tuneforge run directory.",
        lifespan=lifespan,
        docs_url=None if swagger_dir else "/docs",
        redoc_url=None,
    )
    app.state.serve = state

    # --- errors: always JSON with the request id, never a traceback -------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.detail, request_id_of(request), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), request_id_of(request), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only where and what: echoing the input back could return megabytes of text.
        errors = [
            {
                "loc": list(err.get("loc", ())),
                "msg": str(err.get("msg", "")).removeprefix("Value error, "),
                "type": str(err.get("type", "")),
            }
            for err in exc.errors()
        ]
        return error_response(422, errors, request_id_of(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Fallback only: RequestContextMiddleware answers errors raised by the routes itself.
        rid = request_id_of(request)
        logger.error("request %s failed", rid, exc_info=exc)
        return error_response(500, INTERNAL_ERROR, rid)

    # --- routes ----------------------------------------------------------------------------------
    # These two declare the accepted credentials for /docs ("Authorize"); the middleware enforces them.
    api_key_doc = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer_doc = HTTPBearer(auto_error=False)
    secured = [Security(api_key_doc), Security(bearer_doc)] if settings.api_key else []
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (401, 413, 422, 500, 503) if code != 401 or settings.api_key
    }

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=errors,
        dependencies=secured,
        summary="Classify one text or a list of texts",
    )
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        rid = request_id_of(request)
        if not state.ready or state.batcher is None or state.model is None:
            state.metrics.rejected.labels("not_ready").inc()
            raise _not_ready(state)
        texts = body.as_list()
        if len(texts) > settings.max_texts_per_request:
            state.metrics.rejected.labels("too_many_texts").inc()
            raise ApiError(
                413, f"{len(texts)} texts in one request; the limit is {settings.max_texts_per_request}: split it"
            )
        truncated = [len(text) > settings.max_chars for text in texts]
        if any(truncated):
            if not settings.truncate:
                index = truncated.index(True)
                where = "'text'" if body.text is not None else f"'texts'[{index}]"
                state.metrics.rejected.labels("text_too_long").inc()
                raise ApiError(
                    413, f"{where} has {len(texts[index])} characters; the limit is {settings.max_chars} per text"
                )
            texts = [text[: settings.max_chars] for text in texts]
        try:
            probabilities = await state.batcher.submit(texts)
        except QueueFullError:
            state.metrics.rejected.labels("queue_full").inc()
            raise ApiError(
                503, "the server is busy (queue full); retry shortly", {"Retry-After": str(settings.retry_after_s)}
            ) from None
        except BatcherClosedError:
            state.metrics.rejected.labels("shutting_down").inc()
            raise _not_ready(state) from None
        ranked = _rank(probabilities, state.model.labels, body.top_k)
        predictions = [
            {
                "label": top[0][0],
                "probability": round(top[0][1], 6),
                "top_k": [{"label": label, "probability": round(p, 6)} for label, p in top],
                "truncated": cut,
            }
            for top, cut in zip(ranked, truncated, strict=True)
        ]
        started = request.scope.get("state", {}).get("started", time.perf_counter())
        content = {
            "request_id": rid,
            "predictions": predictions,
            "model_version": state.info["version"] if state.info else "",
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        # Returned as a response (not a dict): the body is already in its final shape, and
        # re-validating it against the response model would cost time on every request.
        return JSONResponse(content)

    @app.get("/v1/model", response_model=ModelInfo, responses=errors, dependencies=secured, summary="Model details")
    async def model_info() -> dict[str, Any]:
        if state.info is None or not state.ready:
            raise _not_ready(state)
        return state.info

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and the server accepts work", responses={503: {}})
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        status = "shutting down" if state.shutting_down else "failed" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/metrics", dependencies=secured, summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if state.batcher is not None:
            state.metrics.queue_depth.set(state.batcher.queued_texts)
        content, content_type = state.metrics.render()
        return Response(content, media_type=content_type)

    page = _playground_html()

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        # The page is self-contained; this policy also stops it from loading anything from elsewhere.
        policy = (
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
        )
        return HTMLResponse(page, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"})

    if swagger_dir:
        app.mount("/docs/static", StaticFiles(directory=swagger_dir), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url=app.openapi_url or "/openapi.json",
                title="tuneforge API",
                swagger_js_url="/docs/static/swagger-ui-bundle.js",
                swagger_css_url="/docs/static/swagger-ui.css",
                swagger_favicon_url="/docs/static/favicon-32x32.png",
            )

    # Middleware: the last added runs first. CORS outermost, so preflight requests never need a key.
    app.add_middleware(RequestContextMiddleware, state=state)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes (``--workers N``): settings come from the environment."""
    from tuneforge.serve.server import configure_logging

    settings = ServeSettings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)
