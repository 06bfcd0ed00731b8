"""Run the app under uvicorn: checks that fail fast, worker processes, graceful shutdown.

On SIGTERM or Ctrl+C uvicorn stops listening, lets open requests finish (up to the drain timeout)
and then runs the app's shutdown, which finishes anything still queued: no accepted request is lost.

This module imports the app, never the other way round: the app knows nothing of how it is run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tuneforge.errors import TuneforgeError
from tuneforge.rundir import RunDir, open_run_dir
from tuneforge.serve.metrics import MULTIPROC_ENV
from tuneforge.serve.settings import ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

LOGGER_NAME = "tuneforge.serve"


def configure_logging(level: str) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        # The same shape as uvicorn's lines, so the two read as one log.
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def check_port(host: str, port: int) -> None:
    """Fails fast (one line, before uvicorn starts) when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TuneforgeError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _check_detector(run_dir: Path) -> None:
    """A damaged or mismatched out-of-scope detector stops the start with one line, before uvicorn runs:
    serving the run without it would answer closed-set while clients expect decisions."""
    from tuneforge.infer.openset import has_detector, load_detector

    if has_detector(run_dir):
        load_detector(run_dir, RunDir(run_dir).labels())


def prepare_settings(settings: ServeSettings) -> ServeSettings:
    """Validate everything that can be checked before starting, so bad input is one line and exit 2."""
    settings.validate()
    open_run_dir(settings.run_dir)
    _check_detector(settings.run_dir)
    if settings.threads is None and settings.workers > 1:
        # Workers share the cores; each taking all of them would oversubscribe the machine.
        settings = replace(settings, threads=max(1, (os.cpu_count() or 1) // settings.workers))
    check_port(settings.host, settings.port)
    return settings


def startup_warnings(settings: ServeSettings) -> list[str]:
    """What a person starting this server should know before clients arrive."""
    warnings = []
    if settings.api_key is None and not settings.is_loopback:
        warnings.append(
            f"listening on {settings.host} without an API key: anyone who can reach this address can use the "
            "model; set TUNEFORGE_API_KEY or --api-key-file"
        )
    return warnings


def base_url(settings: ServeSettings) -> str:
    """The server's address as a browser wants it (an IPv6 host in brackets)."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def announce(settings: ServeSettings, line: str, console: Console | None = None) -> None:
    """What the server serves (``line``) and then :func:`startup_warnings`, on stderr."""
    console = console or Console(stderr=True)
    console.print(line, highlight=False)
    for warning in startup_warnings(settings):
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn's options for ``settings``, the same for one process and for workers."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # An access line per request costs more than a batched classification at high load.
        "access_log": settings.log_level == "debug",
        # Whole seconds for uvicorn; rounded up, so that 0.5 s never becomes "no wait at all".
        "timeout_graceful_shutdown": math.ceil(settings.drain_timeout_s),
        "server_header": False,
        "root_path": settings.root_path,
    }


def serve_app(app: FastAPI, settings: ServeSettings) -> int:
    """Serves ``app`` in this process until SIGTERM or Ctrl+C; 1 if it never started (the port was taken)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings)))
    server.run()
    return 0 if server.started else 1


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes (``--workers N``): settings come from the environment."""
    from tuneforge.serve.app import create_app

    settings = ServeSettings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)


def run_server(settings: ServeSettings, *, console: Console | None = None) -> int:
    import uvicorn

    from tuneforge.serve.app import create_app

    settings = prepare_settings(settings)
    configure_logging(settings.log_level)
    where = base_url(settings)
    announce(
        settings,
        f"serving [bold]{settings.run_dir}[/bold] on {where}  (playground {where}/, API docs {where}/docs"
        f"{', API key required' if settings.api_key else ''})",
        console,
    )
    if settings.workers == 1:
        return serve_app(create_app(settings), settings)
    # Worker processes are started fresh by uvicorn and rebuild the app from the environment; their
    # metrics go to a folder of this server's own, so that a scrape of any worker counts all of them.
    metrics_dir = tempfile.mkdtemp(prefix="tuneforge-metrics-")
    os.environ.update({**settings.to_env(), MULTIPROC_ENV: metrics_dir})
    try:
        uvicorn.run(
            "tuneforge.serve.server:app_from_env", factory=True, workers=settings.workers, **uvicorn_options(settings)
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
