"""The HTTP app: classification with dynamic batching, explanations, health, readiness, metrics, playground, docs.

The model loads in a background thread after startup, so the process answers /health at once and
/ready says 503 until the model is warm (and again while the model is stuck in one call). Every
response carries the request id (``X-Request-ID``, taken from the request or generated); errors are
JSON ``{"detail", "request_id"}`` and never contain a stack trace.
"""

# No `from __future__ import annotations` in this module: FastAPI reads the classify route's body type
# when the route is declared, and that type is made per app (its limits come from the settings).

import asyncio
import importlib.util
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import tuneforge
from tuneforge.errors import TuneforgeError
from tuneforge.explain.core import MAX_WORDS, explain_occlusion, label_index, words_to_explain
from tuneforge.explain.occlusion import occlusion_texts
from tuneforge.serve.batcher import (
    BatcherClosedError,
    DynamicBatcher,
    InferenceTimeoutError,
    QueueFullError,
    QueueTimeoutError,
)
from tuneforge.serve.explainer import ExplainBusyError, ExplainLane
from tuneforge.serve.metrics import ServeMetrics
from tuneforge.serve.middleware import (
    INTERNAL_ERROR,
    RequestContextMiddleware,
    error_response,
    latency_ms,
    request_id_of,
)
from tuneforge.serve.model import OpenSetAnswers, ServableModel, answer_batch, describe_model, load_predictor
from tuneforge.serve.schemas import (
    ClassifyResponse,
    ErrorResponse,
    ExplainResponse,
    ModelInfo,
    classify_request_model,
    explain_request_model,
)
from tuneforge.serve.settings import ServeSettings

logger = logging.getLogger("tuneforge.serve")

ModelFactory = Callable[[ServeSettings], ServableModel]
# A validation answer lists this many errors at most: where and what, enough to fix the request.
MAX_ERRORS = 5
# Not sent to anyone (the client has gone); it only labels the request in the metrics, as nginx does.
CLIENT_GONE = 499


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed", "stuck", "shutting down"]


class Health(BaseModel):
    status: Literal["ok"]


class ApiError(Exception):
    """An error answer: status, a message for the client, optional headers."""

    def __init__(self, status: int, detail: str | list[dict[str, Any]], headers: dict[str, str] | None = None) -> None:
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
        # Set with the model: probabilities only, or (the run has a detector) decisions too.
        self.answer: Callable[[list[str]], np.ndarray | OpenSetAnswers] | None = None
        self.info: dict[str, Any] | None = None
        self.load_error: str | None = None
        self.batcher: DynamicBatcher | None = None
        self.explainer: ExplainLane | None = None
        self.shutting_down = False

    @property
    def stuck(self) -> bool:
        """The model has been in one call for longer than any request may take: something hangs."""
        return self.batcher is not None and self.batcher.busy_for > self.settings.request_timeout_s

    @property
    def ready(self) -> bool:
        return self.model is not None and not self.shutting_down and not self.stuck

    @property
    def status(self) -> str:
        if self.shutting_down:
            return "shutting down"
        if self.load_error is not None:
            return "failed"
        if self.model is None:
            return "loading"
        return "stuck" if self.stuck else "ready"

    def infer(self, texts: list[str]) -> np.ndarray | OpenSetAnswers:
        assert self.answer is not None  # submit() is only reached once the model is ready
        return self.answer(texts)

    def load(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a background thread: load, warm up, then hand the model to the event loop."""
        try:
            model = self.model_factory(self.settings)
            answer = answer_batch(model)
            # The first call pays for lazy initialisation (kernels, allocator); do it before /ready,
            # through the same path requests take (a detector's too).
            answer(["warm up"])
            info = describe_model(self.settings, model)
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, TuneforgeError):  # a problem with the run directory, said in one line
                logger.error("the model could not be loaded: %s", message)
            else:
                logger.exception("the model could not be loaded")
            self._call_in_loop(loop, self._failed, message)
            return
        self._call_in_loop(loop, self._loaded, model, answer, info)

    @staticmethod
    def _call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the server stopped while the model was loading

    def _loaded(
        self, model: ServableModel, answer: Callable[[list[str]], np.ndarray | OpenSetAnswers], info: dict[str, Any]
    ) -> None:
        self.info = info
        self.answer = answer
        self.model = model
        self.metrics.model_ready.set(1)
        detector = info.get("detector")
        logger.info(
            "model ready: %s (%s, %d labels%s)",
            info["run_dir"],
            info["form"],
            info["num_labels"],
            f", {detector['method']} out-of-scope detector" if detector else "",
        )

    def _failed(self, message: str) -> None:
        self.load_error = message


def unprocessable(loc: list[Any], message: str, kind: str) -> ApiError:
    """A 422 for one bad field that the request's schema could not check: shaped as a validation error."""
    return ApiError(422, [{"loc": loc, "msg": message, "type": kind}])


def _not_ready(state: ServeState) -> ApiError:
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    status = state.status
    if status == "shutting down":
        return ApiError(503, "the server is shutting down", retry)
    if status == "failed":
        # The reason (often a server path) goes to the server log, not to clients.
        return ApiError(503, "the model failed to load; see the server log")
    if status == "stuck":
        busy = state.batcher.busy_for if state.batcher else 0.0
        return ApiError(503, f"the model has not answered for {busy:.0f} s; retry later", retry)
    return ApiError(503, "the model is still loading; retry shortly", retry)


def _model_call_refused(state: ServeState, exc: Exception) -> ApiError:
    """The answer to a request whose texts the batcher refused or did not answer in time."""
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    if isinstance(exc, QueueFullError):
        state.metrics.rejected.labels("queue_full").inc()
        return ApiError(503, "the server is busy (queue full); retry shortly", retry)
    if isinstance(exc, BatcherClosedError):
        state.metrics.rejected.labels("shutting_down").inc()
        return _not_ready(state)
    if isinstance(exc, QueueTimeoutError):
        state.metrics.rejected.labels("deadline_in_queue").inc()
        return ApiError(503, f"the server is overloaded: the request {exc}; retry shortly", retry)
    state.metrics.rejected.labels("deadline_in_model").inc()
    return ApiError(504, str(exc))


def _field(loc: Sequence[Any]) -> str | None:
    """``'texts'[2]`` for the location ("body", "texts", 2); None for the body as a whole."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    if not parts or not isinstance(parts[0], str):
        return None
    return f"'{parts[0]}'" + "".join(f"[{part}]" for part in parts[1:])


def _error_item(error: dict[str, Any]) -> dict[str, Any]:
    """One validation error as where and what, never the input (it could be megabytes)."""
    loc = list(error.get("loc", ()))
    kind = str(error.get("type", ""))
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    limits = error.get("ctx") or {}
    where = _field(loc)
    if kind == "too_long" and where == "'texts'":
        message = (
            f"{limits.get('actual_length')} texts in one request; the limit is {limits.get('max_length')}: split it"
        )
    elif kind == "string_too_long" and where is not None:
        given = error.get("input")
        length = f" has {len(given)} characters;" if isinstance(given, str) else ":"
        message = f"{where}{length} the limit is {limits.get('max_length')} per text"
    elif kind == "string_unicode" and where is not None:
        message = f"{where}: not valid Unicode (a lone surrogate such as \\ud800): send UTF-8 text"
    elif where is not None:
        message = f"{where}: {message}"
    return {"loc": loc, "msg": message, "type": kind}


def validation_errors(errors: Sequence[dict[str, Any]], limit: int = MAX_ERRORS) -> list[dict[str, Any]]:
    """The first ``limit`` errors, and a last item saying how many more there were."""
    shown = [_error_item(error) for error in errors[:limit]]
    if len(errors) > limit:
        more = len(errors) - limit
        shown.append({"loc": [], "msg": f"and {more} more error{'s' if more > 1 else ''}", "type": "more_errors"})
    return shown


def install_error_handlers(
    app: FastAPI, *, on_validation_error: Callable[[Sequence[dict[str, Any]]], None] | None = None
) -> None:
    """Every error answer of ``app`` is JSON ``{"detail", "request_id"}``, never a traceback: :class:`ApiError`,
    Starlette's HTTP errors, invalid requests (422, each error as where and what, see :func:`validation_errors`)
    and anything unexpected (500, logged with the request id). ``on_validation_error`` sees a request's
    validation errors before the answer (the classification server counts refused requests by reason)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.detail, request_id_of(request), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), request_id_of(request), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if on_validation_error is not None:
            on_validation_error(errors)
        return error_response(422, validation_errors(errors), request_id_of(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Fallback only: RequestContextMiddleware answers errors raised by the routes itself.
        rid = request_id_of(request)
        logger.error("request %s failed", rid, exc_info=exc)
        return error_response(500, INTERNAL_ERROR, rid)


def install_middleware(app: FastAPI, settings: ServeSettings, metrics: ServeMetrics) -> None:
    """Request id, API key, body size limit and metrics for every request; CORS when origins are configured.
    Call it last: the last middleware added runs first, and CORS must be outermost, so that preflight
    requests never need a key."""
    app.add_middleware(RequestContextMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )


# For the served pages (inline script and style, no outside resources): the browser refuses to load anything
# from elsewhere, and no other site may frame them.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
)


def self_contained_page(page: str) -> HTMLResponse:
    """``page`` (a self-contained HTML page) with :data:`PAGE_POLICY` as its Content-Security-Policy."""
    return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})


def _rank(probabilities: np.ndarray, labels: list[str], top_k: int) -> list[list[tuple[str, float]]]:
    k = min(top_k, len(labels))
    # argsort of the negated row: highest first; stable, so ties keep label order.
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(labels[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order, strict=True)]


def _decision_fields(prediction: Any) -> dict[str, Any]:
    """The open-set part of an answer (a :class:`tuneforge.infer.predictor.Prediction` with a decision):
    the label is the detector's (the OOS label when out of scope), not necessarily the top of top_k."""
    return {
        "label": prediction.label,
        "probability": round(float(prediction.probability), 6),
        "decision": prediction.decision,
        "score": round(float(prediction.score), 6),
        "candidates": [{"label": label, "probability": round(float(p), 6)} for label, p in prediction.candidates],
    }


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
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.batcher = DynamicBatcher(
            state.infer,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            metrics=state.metrics,
        )
        state.batcher.start()
        state.explainer = ExplainLane()
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
            state.metrics.process_exiting()

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

    def count_rejected(errors: Sequence[dict[str, Any]]) -> None:
        for reason, kind in (("too_many_texts", "too_long"), ("text_too_long", "string_too_long")):
            if any(error.get("type") == kind for error in errors):
                state.metrics.rejected.labels(reason).inc()

    install_error_handlers(app, on_validation_error=count_rejected)

    # --- routes ----------------------------------------------------------------------------------
    # These two declare the accepted credentials for /docs ("Authorize"); the middleware enforces them.
    api_key_doc = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer_doc = HTTPBearer(auto_error=False)
    secured = [Security(api_key_doc), Security(bearer_doc)] if settings.api_key else []

    def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
        # With a key, every route but the open ones may answer 401.
        return {code: {"model": ErrorResponse} for code in (*codes, 500, *((401,) if settings.api_key else ()))}

    request_model = classify_request_model(max_texts=settings.max_texts_per_request, max_chars=settings.text_limit)

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=documented(400, 413, 422, 503, 504),
        dependencies=secured,
        summary="Classify one text or a list of texts",
    )
    async def classify(body: request_model, request: Request) -> Response:  # type: ignore[valid-type]
        rid = request_id_of(request)
        if not state.ready or state.batcher is None or state.model is None:
            state.metrics.rejected.labels("not_ready").inc()
            raise _not_ready(state)
        texts = body.as_list()
        # Longer than --max-chars passes validation only with --truncate (up to its own limit).
        truncated = [len(text) > settings.max_chars for text in texts]
        if any(truncated):
            texts = [text[: settings.max_chars] for text in texts]
        try:
            answers = await _unless_client_leaves(
                request, state.batcher.submit(texts, timeout_s=settings.request_timeout_s)
            )
        except (QueueFullError, BatcherClosedError, QueueTimeoutError, InferenceTimeoutError) as exc:
            raise _model_call_refused(state, exc) from None
        if answers is None:
            state.metrics.rejected.labels("client_gone").inc()
            return Response(status_code=CLIENT_GONE)
        if isinstance(answers, OpenSetAnswers):
            probabilities, decided = answers.probabilities, answers.predictions
        else:
            probabilities, decided = answers, None
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
        if decided is not None:
            for item, prediction in zip(predictions, decided, strict=True):
                item.update(_decision_fields(prediction))
        content = {
            "request_id": rid,
            "predictions": predictions,
            "model_version": state.info["version"] if state.info else "",
            "latency_ms": latency_ms(request),
        }
        # Returned as a response (not a dict): the body is already in its final shape, and
        # re-validating it against the response model would cost time on every request.
        return JSONResponse(content)

    explain_model = explain_request_model(max_chars=settings.max_chars)

    @app.post(
        "/v1/explain",
        response_model=ExplainResponse,
        responses=documented(400, 413, 422, 503, 504),
        dependencies=secured,
        summary="Which words of a text made the model answer as it did (occlusion)",
        description=(
            "Each word's score is p(label | text) - p(label | text without the word). The text is limited as "
            f"one text of /v1/classify, without truncation, and to {MAX_WORDS} words (422 beyond). Explanations "
            "share the model with classification in small chunks, a few at a time; more at once are answered "
            "503 with Retry-After."
        ),
    )
    async def explain(body: explain_model, request: Request) -> Response:  # type: ignore[valid-type]
        rid = request_id_of(request)
        if not state.ready or state.batcher is None or state.model is None or state.explainer is None:
            state.metrics.rejected.labels("not_ready").inc()
            raise _not_ready(state)
        model = state.model
        try:
            words = words_to_explain(body.text)
        except TuneforgeError as exc:
            state.metrics.rejected.labels("too_many_words").inc()
            raise unprocessable(
                ["body", "text"], f"'text': {str(exc).removeprefix('explain: ')}", "too_many_words"
            ) from None
        try:
            index = label_index(model.labels, body.label)
        except TuneforgeError as exc:
            raise unprocessable(
                ["body", "label"], f"'label': {str(exc).removeprefix('explain: ')}", "unknown_label"
            ) from None
        texts = occlusion_texts(body.text, words)
        try:
            probabilities = await _unless_client_leaves(
                request, state.explainer.probabilities(state.batcher, texts, timeout_s=settings.request_timeout_s)
            )
        except ExplainBusyError:
            state.metrics.rejected.labels("explain_busy").inc()
            retry = {"Retry-After": str(settings.retry_after_s)}
            raise ApiError(503, "the server is busy explaining other texts; retry shortly", retry) from None
        except (QueueFullError, BatcherClosedError, QueueTimeoutError, InferenceTimeoutError) as exc:
            raise _model_call_refused(state, exc) from None
        if probabilities is None:
            state.metrics.rejected.labels("client_gone").inc()
            return Response(status_code=CLIENT_GONE)
        explanation = explain_occlusion(model, body.text, words, index, probabilities)
        content = {
            "request_id": rid,
            **explanation.to_dict(),
            "model_version": state.info["version"] if state.info else "",
            "latency_ms": latency_ms(request),
        }
        return JSONResponse(content)

    @app.get(
        "/v1/model", response_model=ModelInfo, responses=documented(503), dependencies=secured, summary="Model details"
    )
    async def model_info() -> dict[str, Any]:
        if state.info is None or not state.ready:
            raise _not_ready(state)
        return state.info

    @app.get("/health", response_model=Health, summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "loading, failed, stuck or shutting down"}},
        summary="Readiness: the model is loaded, answering, and the server accepts work",
    )
    async def ready() -> JSONResponse:
        status = state.status
        if status == "ready":
            return JSONResponse({"status": status})
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get(
        "/metrics",
        dependencies=secured,
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **documented()},
    )
    async def metrics() -> Response:
        if state.batcher is not None:
            state.metrics.queue_depth.set(state.batcher.queued_texts)
        content, content_type = state.metrics.render()
        return Response(content, media_type=content_type)

    page = _playground_html()

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return self_contained_page(page)

    if swagger_dir:
        app.mount("/docs/static", StaticFiles(directory=swagger_dir), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request) -> HTMLResponse:
            # Under --root-path (a proxy's prefix) or a mount, the browser must ask for the prefixed URLs.
            root = request.scope.get("root_path", "").rstrip("/")
            return get_swagger_ui_html(
                openapi_url=root + (app.openapi_url or "/openapi.json"),
                title="tuneforge API",
                swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
                swagger_css_url=f"{root}/docs/static/swagger-ui.css",
                swagger_favicon_url=f"{root}/docs/static/favicon-32x32.png",
            )

    install_middleware(app, settings, state.metrics)
    return app


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """The result of ``work``, or None if the client goes away first (``work`` is then cancelled,
    which takes a still-queued request out of the queue: nobody would read its answer)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let the cancellation withdraw the request from the queue
    if task.cancelled():
        return None
    return task.result()
