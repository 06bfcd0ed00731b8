"""What every HTTP request goes through: request id, API key, body size limit, metrics.

A plain ASGI middleware (not ``BaseHTTPMiddleware``): it adds no task or copy per request, which
matters at hundreds of requests per second, and it refuses unauthenticated or oversized requests
before their body is read or parsed.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Any

# The function Starlette's router matches routes with: the key check sees the path the router sees,
# whatever --root-path or mount prefix the app runs under.
from starlette._utils import get_route_path
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneforge.serve.metrics import ServeMetrics
from tuneforge.serve.settings import ServeSettings

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed into headers and logs, so only a short, plain token is taken as is.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# With an API key, everything else needs it: a route added later is protected without a thought.
# Liveness and readiness stay open for orchestrators; they answer only "ok", "ready" or why not.
OPEN_PATHS = frozenset({"/health", "/ready"})
INTERNAL_ERROR = "internal server error; quote the request id when reporting it"
logger = logging.getLogger("tuneforge.serve")


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "")) or "-"


def latency_ms(request: Request) -> float:
    """Milliseconds since the middleware took the request (the time a client waited), to 3 decimals."""
    started = request.scope.get("state", {}).get("started", time.perf_counter())
    return round((time.perf_counter() - started) * 1000, 3)


def error_response(
    status: int, detail: str | list[dict[str, Any]], request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "request_id": request_id},
        status_code=status,
        headers={**(headers or {}), REQUEST_ID_HEADER: request_id},
    )


def verify_api_key(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison, so the time taken does not reveal how much of a key was right."""
    if expected is None:
        return True
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def is_open_path(path: str, *, public_docs: bool) -> bool:
    """Whether ``path`` (the route path, without any root path) is answered without the API key.

    ``public_docs``: the playground page, /docs and /openapi.json too; they hold no data, and their
    calls to the API still need the key.
    """
    if path in OPEN_PATHS:
        return True
    return public_docs and (path in ("/", "/docs", "/openapi.json") or path.startswith("/docs/"))


def _given_key(headers: Headers) -> str | None:
    if key := headers.get("x-api-key"):
        return key
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        given_id = headers.get("x-request-id", "")
        rid = given_id if _REQUEST_ID.match(given_id) else uuid.uuid4().hex
        scope.setdefault("state", {}).update(request_id=rid, started=started)
        status = 500
        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status = message["status"]
                responded = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            rejection = self._reject(scope, headers, rid)
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
                return
            await self.app(scope, self._limited(receive), send_with_id)
        except Exception:
            if responded:
                raise  # too late for an error response; the server closes the connection
            # Answered here, with the request id, so that the client never sees a stack trace and
            # the error is logged once, with the id that the client was given.
            logger.exception("request %s failed", rid)
            await error_response(500, INTERNAL_ERROR, rid)(scope, receive, send_with_id)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _reject(self, scope: Scope, headers: Headers, rid: str) -> JSONResponse | None:
        settings = self.settings
        if settings.api_key is not None and not is_open_path(get_route_path(scope), public_docs=settings.public_docs):
            if not verify_api_key(_given_key(headers), settings.api_key):
                self.metrics.rejected.labels("unauthorized").inc()
                return error_response(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                    rid,
                    {"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid Content-Length header", rid)
            if int(length) > settings.body_limit:
                self.metrics.rejected.labels("body_too_large").inc()
                return error_response(
                    413, f"request body of {int(length)} bytes exceeds the limit of {settings.body_limit} bytes", rid
                )
        return None

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that stops a body sent without Content-Length (chunked) at the size limit."""
        limit = self.settings.body_limit
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    self.metrics.rejected.labels("body_too_large").inc()
                    # FastAPI re-raises an HTTPException met while reading the body, so this is a 413.
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        return receive_limited

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        # The route template, never the raw path: unknown paths must not create new time series.
        label = getattr(route, "path", None) or (
            "/docs/static" if get_route_path(scope).startswith("/docs/") else "unmatched"
        )
        metrics = self.metrics
        metrics.requests.labels(label, scope.get("method", ""), str(status)).inc()
        metrics.latency.labels(label).observe(seconds)
