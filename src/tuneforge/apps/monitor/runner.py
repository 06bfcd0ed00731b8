"""The monitor's loop: read records, score them in chunks, store each chunk with its source offset, judge
the windows that closed, hand new alerts to the sinks.

One chunk is one transaction: its new items, its rejected records, the source offset just after its last
record, the newest item time, the rule state and the alerts it caused are committed together, so a monitor
killed at any moment and started again neither loses nor repeats anything. Scoring happens before the
transaction, so readers and the API are never held up by the model. A chunk (``scoring.chunk_size`` records)
is larger than the model's batch (``scoring.batch_size``): the inference engine sorts a chunk's texts by
length before cutting it into batches, so each batch pads little (a batch of random-length texts is padded,
and attended over, to its longest one).

``Monitor.ingest`` takes one chunk from anywhere (a file, stdin, an HTTP handler: it is thread-safe);
``Monitor.consume`` drives it from a source, with optional replay pacing (``speed``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO
from zoneinfo import ZoneInfo

from tuneforge.apps.monitor.config import MonitorConfig
from tuneforge.apps.monitor.entities import build_matcher
from tuneforge.apps.monitor.evaluate import Evaluator
from tuneforge.apps.monitor.items import BadItem, Item, Record, Rejected, iso, parse_timestamp, to_item
from tuneforge.apps.monitor.score import ItemScorer, Scorer
from tuneforge.apps.monitor.sinks import Sinks, build_sinks
from tuneforge.apps.monitor.sources import FileSource, stdin_records
from tuneforge.apps.monitor.store import Alert, Store

MAX_TS_KEY = "max_ts"


@dataclass
class IngestReport:
    """What became of a chunk (or, added up, of a whole run)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    alerts: list[Alert] = field(default_factory=list)
    interrupted: bool = False
    # Each rejected record with where it was and why (the HTTP API answers them per item).
    rejections: list[Rejected] = field(default_factory=list)

    def add(self, other: IngestReport) -> None:
        self.received += other.received
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.rejected.update(other.rejected)
        self.alerts += other.alerts
        self.rejections += other.rejections

    def summary(self) -> str:
        rejected = sum(self.rejected.values())
        line = f"{self.received:,} records: {self.stored:,} stored, {self.duplicates:,} already stored"
        line += f", {rejected:,} rejected" if rejected else ""
        if rejected:
            line += " (" + "; ".join(f"{reason}: {n}" for reason, n in self.rejected.most_common(5)) + ")"
        return line + f"; {len(self.alerts)} alerts"


def _reason_kind(reason: str) -> str:
    """Rejection reasons without their particulars, for counting ("late by 2h" and "late by 3h" are one)."""
    return reason.split(":")[0].split(" (")[0]


class Monitor:
    """A store, a scorer, the rules and the sinks, for one monitor config."""

    def __init__(
        self,
        config: MonitorConfig,
        *,
        store: Store | None = None,
        scorer: ItemScorer | None = None,
        sinks: Sinks | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.zone = ZoneInfo(config.source.timezone)
        self.lateness = config.source.lateness_seconds
        self.warn = warn or (lambda message: None)
        entities = config.entities
        self.matcher = build_matcher(
            entities.aliases,
            entities.alias_file,
            case_sensitive=entities.case_sensitive,
            match_entity_names=entities.match_entity_names,
        )
        self.store = store if store is not None else Store(config.store.path)
        self.scorer = scorer if scorer is not None else Scorer(config.scoring)
        self.store.check_scoring(self.scorer.identity())
        self.evaluator = Evaluator(config, self.store)
        self.sinks = sinks if sinks is not None else build_sinks(config.sinks)
        self.lock = threading.Lock()
        # Alerts stored by a monitor that stopped before handing them over.
        with self.lock:
            self._dispatch(self.store.undispatched_alerts())

    def close(self, timeout: float = 10.0) -> None:
        self.sinks.close(timeout)
        self.store.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one chunk -------------------------------------------------------------------------------------

    def ingest(self, records: Sequence[Record], *, source: str | None = None) -> IngestReport:
        """Store a chunk of records: parse, skip ids already stored, reject what cannot be an item or comes too
        late, score the rest, and commit items, rejections, the source offset (of the last record that has
        one) and the alerts of the windows this chunk closed, in one transaction."""
        with self.lock:
            return self._ingest(records, source)

    def _ingest(self, records: Sequence[Record], source: str | None) -> IngestReport:
        report = IngestReport()
        rejected: list[Rejected] = []
        parsed: list[tuple[Record, Item]] = []
        for record in records:
            if record.blank:
                continue
            report.received += 1
            if record.error is not None:
                rejected.append(Rejected(record.where, record.error, raw=record.raw))
                continue
            try:
                parsed.append((record, to_item(record, self.config.source.columns, self.zone, self.matcher)))
            except BadItem as exc:
                rejected.append(Rejected(record.where, str(exc), raw=record.raw))
        known = self.store.known_ids(item.id for _, item in parsed)
        max_ts = self.store.get_state(MAX_TS_KEY)
        ahead = self.config.source.max_ahead_seconds
        now = time.time()
        fresh: list[Item] = []
        seen: set[str] = set()
        for record, item in parsed:
            if item.id in known or item.id in seen:
                report.duplicates += 1
                continue
            if ahead is not None and item.ts > now + ahead:
                reason = f"in the future: {iso(item.ts)} is {_duration(item.ts - now)} ahead of the clock"
                rejected.append(Rejected(record.where, reason, id=item.id, raw=record.raw))
                continue
            if max_ts is not None and item.ts < max_ts - self.lateness:
                behind = max_ts - item.ts
                reason = (
                    f"out of order: {_duration(behind)} older than the newest item ({iso(max_ts)})"
                    if self.lateness == 0
                    else f"too late: {_duration(behind)} older than the newest item ({iso(max_ts)}), "
                    f"lateness {_duration(self.lateness)}"
                )
                rejected.append(Rejected(record.where, reason, id=item.id, raw=record.raw))
                continue
            seen.add(item.id)
            fresh.append(item)
            max_ts = item.ts if max_ts is None else max(max_ts, item.ts)
        scored = self.scorer.score(fresh)
        offset = next((r.offset for r in reversed(records) if r.offset is not None), None)
        with self.store.transaction():
            report.stored = self.store.insert_items(scored, source)
            report.duplicates += len(scored) - report.stored
            self.store.add_rejected(rejected, source)
            if source is not None and offset is not None:
                self.store.set_offset(source, offset)
            if max_ts is not None:
                self.store.set_state(MAX_TS_KEY, max_ts)
                report.alerts = self.evaluator.advance(max_ts - self.lateness)
        report.rejections = rejected
        for one in rejected:
            report.rejected[_reason_kind(one.reason)] += 1
            self.warn(f"{one.where}: rejected: {one.reason}")
        self._dispatch(report.alerts)
        return report

    def finish(self) -> list[Alert]:
        """Judge the windows still open (the end of a backtest: no more items will come)."""
        with self.lock:
            max_ts = self.store.get_state(MAX_TS_KEY)
            if max_ts is None:
                return []
            with self.store.transaction():
                alerts = self.evaluator.finish(max_ts)
            self._dispatch(alerts)
            return alerts

    def _dispatch(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        for alert in alerts:
            self.sinks.send(alert)
        with self.store.transaction():
            self.store.mark_dispatched([alert.id for alert in alerts if alert.id is not None])

    # ---- a stream of records ---------------------------------------------------------------------------

    def consume(
        self,
        records: Iterable[Record | None],
        *,
        source: str | None = None,
        speed: float | None = None,
        on_batch: Callable[[IngestReport], None] | None = None,
    ) -> IngestReport:
        """Ingest ``records`` in chunks of ``scoring.chunk_size``; ``None`` in the stream (a quiet source) commits
        what is held, so a live source never waits for a chunk to fill. With ``speed``, records are paced by
        their timestamps (``speed`` stream seconds per wall second). ``on_batch`` hears each committed chunk.
        Ctrl-C (or SIGTERM, where the CLI maps it so) commits what is held and returns."""
        total = IngestReport()
        chunk: list[Record] = []
        chunk_size = self.config.scoring.chunk_size
        pace = _Pacer(speed, self.config.source.columns.timestamp, self.zone) if speed else None

        def flush() -> None:
            if chunk:
                report = self.ingest(chunk, source=source)
                chunk.clear()
                total.add(report)
                if on_batch is not None:
                    on_batch(report)

        try:
            for record in records:
                if record is None:
                    flush()
                    continue
                if pace is not None and pace.wait_needed(record):
                    flush()
                    pace.wait()
                chunk.append(record)
                if len(chunk) >= chunk_size:
                    flush()
            flush()
        except KeyboardInterrupt:
            total.interrupted = True
            flush()  # a chunk cut off mid-commit was rolled back and is still held
        return total


class _Pacer:
    """Replay pacing: a record is due ``(ts - first ts) / speed`` wall seconds after the first one."""

    def __init__(self, speed: float, column: str, zone: ZoneInfo) -> None:
        self.speed, self.column, self.zone = speed, column, zone
        self.origin: tuple[float, float] | None = None
        self.due = 0.0

    def wait_needed(self, record: Record) -> bool:
        try:
            ts = parse_timestamp(record.fields.get(self.column), self.zone)
        except BadItem:
            return False
        if self.origin is None:
            self.origin = (ts, time.monotonic())
            return False
        self.due = self.origin[1] + (ts - self.origin[0]) / self.speed
        return self.due > time.monotonic()

    def wait(self) -> None:
        time.sleep(max(0.0, self.due - time.monotonic()))


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def open_source(
    config: MonitorConfig,
    store: Store,
    *,
    stop: Callable[[], bool] = lambda: False,
    stdin: IO[bytes] | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> tuple[Iterator[Record | None], str | None]:
    """The configured source's records, resumed from the store's offset for a file; and the source's name in the
    store (``None`` for stdin, which cannot be resumed: ids alone keep it from storing an item twice)."""
    source = config.source
    fmt = source.resolved_format
    if source.type == "stdin":
        return stdin_records(stdin if stdin is not None else sys.stdin.buffer, fmt, source.encoding), None
    assert source.path is not None
    file = FileSource(source.path, fmt, source.encoding, follow=source.type == "follow")

    def truncated(was: int, now: int) -> None:
        warn(f"{source.path}: shrank from {was:,} to {now:,} bytes (rotated?); reading it again from the start")

    offset = store.offset(file.name)
    if offset > file.size() and source.type == "file":
        truncated(offset, file.size())
        offset = 0
    records = file.records(offset, poll_interval=source.poll_interval, stop=stop, on_truncated=truncated)
    return records, file.name
