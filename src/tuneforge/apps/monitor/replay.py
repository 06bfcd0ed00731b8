"""A backtest: a whole file replayed in timestamp order into a store of its own, every window judged, the
alerts returned (for the table and the plots).

The backtest store is made afresh each time (``<store>-replay.sqlite`` beside the live one by default), so
a replay never mixes with the live series, and changed rules are judged on the whole history again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from tuneforge.apps.monitor.config import MonitorConfig
from tuneforge.apps.monitor.items import BadItem, Record, parse_timestamp
from tuneforge.apps.monitor.runner import IngestReport, Monitor
from tuneforge.apps.monitor.score import ItemScorer
from tuneforge.apps.monitor.sinks import Sinks
from tuneforge.apps.monitor.sources import FileSource
from tuneforge.apps.monitor.store import Alert, Store
from tuneforge.errors import ConfigError, DataError


@dataclass
class ReplayResult:
    report: IngestReport
    alerts: list[Alert]
    store_path: Path


def replay_store_path(config: MonitorConfig) -> Path:
    path = config.store.path
    return path.with_name(f"{path.stem}-replay{path.suffix or '.sqlite'}")


def sorted_records(path: Path, config: MonitorConfig) -> list[Record]:
    """Every record of ``path`` in timestamp order (stable: ties keep the file's order); records without a
    readable timestamp come first, to be rejected with their reason."""
    fmt = config.source.format
    if fmt == "auto":
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in ("csv", "jsonl"):
            raise DataError(f"{path}: use a .csv or .jsonl file (or set source.format)")
    records = [r for r in FileSource(path, fmt, config.source.encoding).read(0) if not r.blank]
    zone = ZoneInfo(config.source.timezone)
    column = config.source.columns.timestamp

    def key(record: Record) -> float:
        try:
            return parse_timestamp(record.fields.get(column), zone)
        except BadItem:
            return float("-inf")

    return sorted(records, key=key)


def _remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def replay(
    config: MonitorConfig,
    data: Path,
    *,
    store_path: Path | None = None,
    speed: float | None = None,
    sinks: Sinks | None = None,
    scorer: ItemScorer | None = None,
    warn: Callable[[str], None] | None = None,
) -> ReplayResult:
    """Backtest ``config``'s rules on ``data``; the alerts, oldest first."""
    store_path = store_path or replay_store_path(config)
    if store_path.absolute() == config.store.path.absolute():
        raise ConfigError(f"--store: {store_path} is the live store (store.path); a backtest needs its own")
    if not data.is_file():
        raise DataError(f"{data}: file not found")
    records = sorted_records(data, config)
    _remove_store(store_path)
    monitor = Monitor(config, store=Store(store_path), scorer=scorer, sinks=sinks or Sinks([]), warn=warn)
    try:
        report = monitor.consume(records, source=None, speed=speed)
        if not report.interrupted:
            report.alerts += monitor.finish()
        alerts = sorted(report.alerts, key=lambda a: (a.window_start, a.entity, a.rule))
    finally:
        monitor.close()
    return ReplayResult(report, alerts, store_path)
