"""``tuneforge monitor run | replay | serve CONFIG``: the monitor's command line (wired in by tuneforge.cli)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:  # loaded when a command runs: building the parser must stay light
    from tuneforge.apps.monitor.config import MonitorConfig
    from tuneforge.apps.monitor.runner import IngestReport

_WARNINGS_SHOWN = 20


def add_monitor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor", help="financial sentiment monitoring: score a stream of news, track it per company, alert early"
    )
    monitor = p.add_subparsers(dest="monitor_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("config", type=Path, help="the monitor's YAML")
        q.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
        )

    q = monitor.add_parser("run", help="ingest the configured source (file, follow, stdin) into the store, live")
    common(q)
    q.add_argument("--verbose", action="store_true", help="a line per committed batch")

    q = monitor.add_parser("replay", help="backtest: replay a file in timestamp order, print the alerts, plot them")
    common(q)
    q.add_argument("--data", type=Path, required=True, help="a .csv or .jsonl file of items")
    q.add_argument("--store", type=Path, help="the backtest's store (default: <store>-replay.sqlite, made afresh)")
    q.add_argument("--plots", type=Path, help="folder for the plots (default: <backtest store>-plots)")
    q.add_argument("--speed", type=float, help="pace the replay: stream seconds per wall second (default: no pacing)")
    q.add_argument("--sinks", action="store_true", help="also send the alerts to the configured sinks")

    q = monitor.add_parser(
        "serve", help="the monitor with its HTTP API (POST /v1/ingest) and dashboard; reads the file source too"
    )
    common(q)
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=int, default=8080)
    q.add_argument("--api-only", action="store_true", help="do not read the configured file source; ingest over HTTP")
    q.add_argument("--max-items", type=int, default=64, help="items per ingest request at most (else 422)")
    q.add_argument("--max-chars", type=int, default=2000, help="characters per text at most (else 422)")
    q.add_argument("--max-queue", type=int, default=1024, help="items waiting to be stored; beyond: 503 + Retry-After")
    q.add_argument(
        "--api-key",
        help="require this key (Authorization: Bearer KEY or X-API-Key); visible in `ps`: prefer env "
        "TUNEFORGE_API_KEY or --api-key-file",
    )
    q.add_argument("--api-key-file", type=Path, help="require the key written in this file (its first line)")
    q.add_argument(
        "--public-dashboard",
        action="store_true",
        help="with a key: the dashboard page stays open (it asks for the key; its API calls still need it)",
    )
    q.add_argument("--request-timeout", type=float, default=30.0, help="seconds an explanation may wait and run")
    q.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish accepted work on shutdown")
    q.add_argument("--root-path", default="", help="the prefix a reverse proxy serves this under (e.g. /monitor)")
    q.add_argument(
        "--cors-origin", dest="cors_origins", action="append", default=[], help="allow this browser origin (repeatable)"
    )
    q.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _warner(console: Console) -> Callable[[str], None]:
    shown = [0]

    def warn(message: str) -> None:
        shown[0] += 1
        if shown[0] <= _WARNINGS_SHOWN:
            console.print(f"warning: {message}", highlight=False, markup=False)
        elif shown[0] == _WARNINGS_SHOWN + 1:
            console.print("warning: more warnings; the summary counts them", highlight=False)

    return warn


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager stopping the monitor) ends it like Ctrl-C: the batch held is committed."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_monitor_command(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.apps.monitor.config import load_monitor_config

    config = load_monitor_config(args.config, args.overrides)
    if args.monitor_command == "run":
        return _run(args, config, console)
    if args.monitor_command == "replay":
        return _replay(args, config, console)
    return _serve(args, config, console)


def _serve(args: argparse.Namespace, config: MonitorConfig, console: Console) -> int:
    from tuneforge.apps.monitor.server import monitor_serve_settings, run_monitor_server
    from tuneforge.serve.settings import resolve_api_key

    api_key = resolve_api_key(args.api_key, args.api_key_file)
    # Checked here, not by the settings, whose messages name `tuneforge serve`'s --max-texts.
    if args.max_items < 1:
        raise TuneforgeError("--max-items: must be at least 1")
    if args.max_queue < args.max_items:
        raise TuneforgeError(
            f"--max-queue: must be at least --max-items ({args.max_items}), or a full request never fits"
        )
    settings = monitor_serve_settings(
        config,
        host=args.host,
        port=args.port,
        max_texts_per_request=args.max_items,
        max_chars=args.max_chars,
        max_queue=args.max_queue,
        api_key=api_key,
        public_docs=args.public_dashboard,
        cors_origins=tuple(args.cors_origins),
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        root_path=args.root_path,
        log_level=args.log_level,
    )
    return run_monitor_server(config, settings, read_source=not args.api_only, console=console)


def _run(args: argparse.Namespace, config: MonitorConfig, console: Console) -> int:
    from tuneforge.apps.monitor.runner import Monitor, open_source

    warn = _warner(console)

    def progress(report: IngestReport) -> None:
        if args.verbose:
            console.print(f"batch: {report.summary()}", highlight=False)

    with _sigterm_as_interrupt():
        monitor = Monitor(config, warn=warn)
        try:
            records, source = open_source(config, monitor.store, warn=warn)
            shown = source or "stdin"
            console.print(f"monitor: {shown} -> {config.store.path} ({len(config.rules)} rules)", highlight=False)
            report = monitor.consume(records, source=source, speed=config.source.speed, on_batch=progress)
        finally:
            monitor.close()
    console.print(("stopped: " if report.interrupted else "done: ") + report.summary(), highlight=False)
    webhook = monitor.sinks.webhook()
    if webhook is not None:
        console.print(f"webhook: {webhook.stats()}", highlight=False)
    return 0


def _replay(args: argparse.Namespace, config: MonitorConfig, console: Console) -> int:
    from tuneforge.apps.monitor.replay import replay
    from tuneforge.apps.monitor.report import alert_table, write_plots
    from tuneforge.apps.monitor.sinks import Sinks, build_sinks
    from tuneforge.apps.monitor.store import Store

    if args.speed is not None and args.speed <= 0:
        raise TuneforgeError(f"--speed: must be above 0, got {args.speed}")
    sinks = build_sinks(config.sinks) if args.sinks else Sinks([])
    with _sigterm_as_interrupt():
        result = replay(config, args.data, store_path=args.store, speed=args.speed, sinks=sinks, warn=_warner(console))
    out = Console(file=sys.stdout, width=200)
    out.print(alert_table(result.alerts, title=f"{len(result.alerts)} alerts in {args.data.name}"))
    plots_dir = args.plots or result.store_path.with_name(f"{result.store_path.stem}-plots")
    with Store(result.store_path, readonly=True) as store:
        plots = write_plots(store, result.alerts, plots_dir, alpha=config.smoothing)
    console.print(("stopped: " if result.report.interrupted else "done: ") + result.report.summary(), highlight=False)
    console.print(f"store: {result.store_path}", highlight=False)
    if plots:
        console.print(f"plots: {plots_dir} ({len(plots)})", highlight=False)
    return 0
