"""The monitor's store: one SQLite file (WAL), written by one monitor, read by any number of readers.

Nothing lost, nothing twice. Items are keyed by id (``INSERT OR IGNORE``: the same item ingested again is a
no-op), and a file source's byte offset is written in the same transaction as the items it covers, along
with the rule state and the alerts those items caused; a monitor killed at any moment leaves either all of
a batch or none of it, and a restart reads on from the offset of the last batch stored. Alerts are keyed
by rule, entity, window and window start, so evaluating a window again never raises its alert twice.

Reading (for a dashboard or an API): ``entities``, ``time_range``, ``window_counts`` (per entity and
window, raw sums; :func:`tuneforge.apps.monitor.aggregate.series` turns them into the dense series with
shares and the smoothed index), ``items``, ``alerts``, ``alert``, ``alert_items``, ``rejected`` and
``stats``. Open a reader with ``Store(path, readonly=True)``; it never blocks the writer. Window sums kept
beside the items (:mod:`tuneforge.apps.monitor.rollup`, same transaction) let a dashboard read a series in
time that does not grow with the item count (:mod:`tuneforge.apps.monitor.views`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneforge.apps.monitor import rollup
from tuneforge.apps.monitor.items import OVERALL, Item, Rejected, iso
from tuneforge.errors import ConfigError, TuneforgeError

SCHEMA_VERSION = 1
_RAW_KEPT = 2000  # characters of a rejected record kept for the analyst

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    text TEXT NOT NULL,
    label TEXT NOT NULL,
    probability REAL NOT NULL,
    p_positive REAL NOT NULL,
    p_negative REAL NOT NULL,
    signed REAL NOT NULL,
    sentiment TEXT NOT NULL,
    source TEXT,
    ingested_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_ts ON items (ts);
CREATE TABLE IF NOT EXISTS item_entities (
    item_id TEXT NOT NULL REFERENCES items (id),
    entity TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (item_id, entity)
);
CREATE INDEX IF NOT EXISTS item_entities_entity_ts ON item_entities (entity, ts);
-- Closing a window reads every entity's items in it: by time, not a scan of the whole table.
CREATE INDEX IF NOT EXISTS item_entities_ts ON item_entities (ts);
CREATE TABLE IF NOT EXISTS source_offsets (source TEXT PRIMARY KEY, offset INTEGER NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    source TEXT,
    location TEXT NOT NULL,
    reason TEXT NOT NULL,
    item_id TEXT,
    raw TEXT NOT NULL,
    at REAL NOT NULL
);
-- A file's record is rejected once, even if a batch is handed over again after an interruption
-- (NULL sources, stdin and the API, have no stable place to key on).
CREATE UNIQUE INDEX IF NOT EXISTS rejected_once ON rejected (source, location);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    rule TEXT NOT NULL,
    type TEXT NOT NULL,
    entity TEXT NOT NULL,
    window TEXT NOT NULL,
    window_start REAL NOT NULL,
    window_end REAL NOT NULL,
    field TEXT NOT NULL,
    value REAL NOT NULL,
    threshold REAL,
    detail TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at REAL NOT NULL,
    dispatched INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alerts_entity_start ON alerts (entity, window_start);
CREATE INDEX IF NOT EXISTS alerts_start ON alerts (window_start);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ScoredItem:
    """An item with the model's answer: the top label and its (calibrated) probability, the summed
    probabilities of the positive and negative labels, and the role of the top role."""

    item: Item
    label: str
    probability: float
    p_positive: float
    p_negative: float
    sentiment: str  # positive | negative | neutral

    @property
    def signed(self) -> float:
        return self.p_positive - self.p_negative


@dataclass(frozen=True)
class StoredItem:
    id: str
    ts: float
    text: str
    label: str
    probability: float
    p_positive: float
    p_negative: float
    signed: float
    sentiment: str
    source: str | None
    entities: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "entities": list(self.entities), "time": iso(self.ts)}


@dataclass(frozen=True)
class Alert:
    """One rule firing for one entity on one window."""

    rule: str
    type: str
    entity: str
    window: str
    window_start: float
    window_end: float
    field: str
    value: float
    threshold: float | None
    message: str
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    created_at: float | None = None

    @property
    def key(self) -> str:
        """What makes an alert the same alert: evaluating its window again finds this key taken."""
        return f"{self.rule}|{self.entity}|{self.window}|{self.window_start!r}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "key": self.key,
            "window_start_time": iso(self.window_start),
            "window_end_time": iso(self.window_end),
        }


@dataclass(frozen=True)
class WindowCounts:
    """Raw sums of one entity's items in one window (only windows with items are returned)."""

    entity: str
    start: float
    volume: int
    negative: int
    positive: int
    signed_sum: float


@dataclass(frozen=True)
class EntitySummary:
    entity: str
    volume: int
    first_ts: float
    last_ts: float


_ITEM_COLUMNS = "id, ts, text, label, probability, p_positive, p_negative, signed, sentiment, source"
_ALERT_COLUMNS = (
    "id, rule, type, entity, window, window_start, window_end, field, value, threshold, message, detail, created_at"
)


class Store:
    """A monitor's SQLite file. Writes happen inside ``transaction()``; reads anywhere."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        try:
            if readonly:
                if not self.path.is_file():
                    raise TuneforgeError(f"{self.path}: no monitor store here")
                self.conn = sqlite3.connect(
                    f"file:{self.path.absolute()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self.conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed batch survives a power cut too, not only a killed process.
                self.conn.execute("PRAGMA synchronous=FULL")
                self.conn.executescript(_SCHEMA)
            self.conn.execute("PRAGMA busy_timeout=10000")
            self._check_schema()
            if not readonly:
                rollup.ensure(self.conn)
        except sqlite3.DatabaseError as exc:
            raise TuneforgeError(f"{self.path}: not a usable monitor store ({exc})") from None
        self._in_transaction = False

    def _check_schema(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None and not self.readonly:
            self.conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row is not None and int(row[0]) != SCHEMA_VERSION:
            raise TuneforgeError(f"{self.path}: store schema {row[0]}, this tuneforge reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """All writes inside are committed together, or (error, crash, kill) none of them."""
        if self._in_transaction:
            raise RuntimeError("transactions do not nest")
        self.conn.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield self
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._in_transaction = False

    # ---- the scoring the store was filled with ---------------------------------------------------------

    def check_scoring(self, scoring: dict[str, Any]) -> None:
        """Refuse to mix scores from two models (or two label mappings) in one series."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'scoring'").fetchone()
        if row is None:
            with self.transaction():
                self.conn.execute("INSERT INTO meta VALUES ('scoring', ?)", (json.dumps(scoring, sort_keys=True),))
            return
        stored = json.loads(row[0])
        if stored != scoring:
            raise ConfigError(
                f"store.path: {self.path} holds items scored by {stored}, not by {scoring}; scores from two "
                "models would mix in one series: give this config its own store.path"
            )

    # ---- writes ----------------------------------------------------------------------------------------

    def known_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are stored already (so they are not scored again)."""
        wanted = list(dict.fromkeys(ids))
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            found.update(row[0] for row in self.conn.execute(f"SELECT id FROM items WHERE id IN ({marks})", part))
        return found

    def insert_items(self, scored: Sequence[ScoredItem], source: str | None) -> int:
        """Store items not stored yet (an id seen before is ignored, entities included); how many were new."""
        now = time.time()
        inserted = 0
        stored: list[tuple[tuple[str, ...], float, str, float]] = []
        for one in scored:
            item = one.item
            cursor = self.conn.execute(
                "INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item.id,
                    item.ts,
                    item.text,
                    one.label,
                    one.probability,
                    one.p_positive,
                    one.p_negative,
                    one.signed,
                    one.sentiment,
                    source,
                    now,
                ),
            )
            if cursor.rowcount:
                inserted += 1
                stored.append((item.entities, item.ts, one.sentiment, one.signed))
                self.conn.executemany(
                    "INSERT OR IGNORE INTO item_entities VALUES (?, ?, ?)",
                    [(item.id, entity, item.ts) for entity in item.entities],
                )
        rollup.add(self.conn, stored)
        return inserted

    def add_rejected(self, rejected: Sequence[Rejected], source: str | None) -> None:
        now = time.time()
        self.conn.executemany(
            "INSERT OR IGNORE INTO rejected (source, location, reason, item_id, raw, at) VALUES (?, ?, ?, ?, ?, ?)",
            [(source, r.where, r.reason, r.id, r.raw[:_RAW_KEPT], now) for r in rejected],
        )

    def offset(self, source: str) -> int:
        row = self.conn.execute("SELECT offset FROM source_offsets WHERE source = ?", (source,)).fetchone()
        return int(row[0]) if row else 0

    def set_offset(self, source: str, offset: int) -> None:
        self.conn.execute(
            "INSERT INTO source_offsets VALUES (?, ?, ?) ON CONFLICT (source) DO UPDATE "
            "SET offset = excluded.offset, updated_at = excluded.updated_at",
            (source, offset, time.time()),
        )

    def get_state(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_state(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT INTO state VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def states(self, prefix: str) -> dict[str, Any]:
        """Every state whose key starts with ``prefix``, by the rest of the key."""
        rows = self.conn.execute(
            "SELECT key, value FROM state WHERE key >= ? AND key < ?", (prefix, prefix + "\U0010ffff")
        )
        return {key[len(prefix) :]: json.loads(value) for key, value in rows}

    def insert_alert(self, alert: Alert) -> Alert | None:
        """Store an alert; ``None`` when the same alert (same key) is stored already."""
        now = time.time()
        cursor = self.conn.execute(
            "INSERT OR IGNORE INTO alerts (key, rule, type, entity, window, window_start, window_end, field, value, "
            "threshold, detail, message, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                alert.key,
                alert.rule,
                alert.type,
                alert.entity,
                alert.window,
                alert.window_start,
                alert.window_end,
                alert.field,
                alert.value,
                alert.threshold,
                json.dumps(alert.detail),
                alert.message,
                now,
            ),
        )
        if not cursor.rowcount:
            return None
        return replace(alert, id=cursor.lastrowid, created_at=now)

    def undispatched_alerts(self) -> list[Alert]:
        """Alerts stored but not yet handed to the sinks (the monitor stopped in between)."""
        rows = self.conn.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE dispatched = 0 ORDER BY id").fetchall()
        return [_alert(row) for row in rows]

    def mark_dispatched(self, ids: Sequence[int]) -> None:
        self.conn.executemany("UPDATE alerts SET dispatched = 1 WHERE id = ?", [(i,) for i in ids])

    def clear_evaluation(self) -> None:
        """Forget alerts and rule state (a backtest evaluates the stored items again from scratch)."""
        self.conn.execute("DELETE FROM alerts")
        self.conn.execute("DELETE FROM state")

    # ---- reads -----------------------------------------------------------------------------------------

    def entities(self) -> list[EntitySummary]:
        """Every entity seen, busiest first, with its item count and first and last item times."""
        rows = self.conn.execute(
            "SELECT entity, COUNT(*), MIN(ts), MAX(ts) FROM item_entities GROUP BY entity "
            "ORDER BY COUNT(*) DESC, entity"
        ).fetchall()
        return [EntitySummary(entity, volume, first, last) for entity, volume, first, last in rows]

    def time_range(self, entity: str | None = None) -> tuple[float, float] | None:
        """First and last item times of ``entity`` (``None`` or ``'*'``: all items); ``None`` when it has none."""
        # Two subqueries: SQLite answers a lone MIN or MAX from the index's ends, but MIN and MAX together by a scan.
        if entity is None or entity == OVERALL:
            row = self.conn.execute("SELECT (SELECT MIN(ts) FROM items), (SELECT MAX(ts) FROM items)").fetchone()
        else:
            row = self.conn.execute(
                "SELECT (SELECT MIN(ts) FROM item_entities WHERE entity = ?1), "
                "(SELECT MAX(ts) FROM item_entities WHERE entity = ?1)",
                (entity,),
            ).fetchone()
        return None if row is None or row[0] is None else (float(row[0]), float(row[1]))

    def window_counts(
        self,
        window_seconds: float,
        *,
        entities: Sequence[str] | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> list[WindowCounts]:
        """Per entity and window (aligned on the epoch, UTC) in ``[start, end)``: volume, negative and positive
        counts, sum of signed sentiment. ``entities`` None: every entity and ``'*'`` (all items)."""
        lo, hi = _bounds(start, end)
        wanted = None if entities is None else list(dict.fromkeys(entities))
        out: list[WindowCounts] = []
        bucket = "CAST(i.ts / :w AS INTEGER)"
        sums = f"{bucket} AS b, COUNT(*), SUM(i.sentiment = 'negative'), SUM(i.sentiment = 'positive'), SUM(i.signed)"
        params: dict[str, Any] = {"w": window_seconds, "lo": lo, "hi": hi}
        if wanted is None or OVERALL in wanted:
            rows = self.conn.execute(
                f"SELECT {sums} FROM items i WHERE i.ts >= :lo AND i.ts < :hi GROUP BY b ORDER BY b", params
            )
            out.extend(WindowCounts(OVERALL, b * window_seconds, n, neg, pos, s) for b, n, neg, pos, s in rows)
        named = None if wanted is None else [e for e in wanted if e != OVERALL]
        if named is None or named:
            where = "e.ts >= :lo AND e.ts < :hi"
            if named is not None:
                marks = ",".join(f":e{i}" for i in range(len(named)))
                where += f" AND e.entity IN ({marks})"
                params.update({f"e{i}": name for i, name in enumerate(named)})
            rows = self.conn.execute(
                f"SELECT e.entity, {sums} FROM item_entities e JOIN items i ON i.id = e.item_id WHERE {where} "
                "GROUP BY e.entity, b ORDER BY e.entity, b",
                params,
            )
            out.extend(WindowCounts(e, b * window_seconds, n, neg, pos, s) for e, b, n, neg, pos, s in rows)
        return out

    def items(
        self,
        *,
        entity: str | None = None,
        start: float | None = None,
        end: float | None = None,
        sentiment: str | None = None,
        order: str = "newest",
        limit: int = 100,
        offset: int = 0,
    ) -> list[StoredItem]:
        """Stored items (with their entities) of ``entity`` (None or ``'*'``: all) in ``[start, end)``, optionally
        of one sentiment; ``order``: newest, oldest, most_negative or most_positive."""
        orders = {
            "newest": "i.ts DESC",
            "oldest": "i.ts ASC",
            "most_negative": "i.signed ASC",
            "most_positive": "i.signed DESC",
        }
        if order not in orders:
            raise TuneforgeError(f"order: one of {', '.join(orders)}, got {order!r}")
        clauses, params = ["i.ts >= ?", "i.ts < ?"], list(_bounds(start, end))
        source = "items i"
        if entity is not None and entity != OVERALL:
            source = "item_entities e JOIN items i ON i.id = e.item_id"
            clauses = ["e.entity = ?", "e.ts >= ?", "e.ts < ?"]
            params = [entity, *params]
        if sentiment is not None:
            clauses.append("i.sentiment = ?")
            params.append(sentiment)
        rows = self.conn.execute(
            f"SELECT {', '.join('i.' + c for c in _ITEM_COLUMNS.split(', '))} FROM {source} "
            f"WHERE {' AND '.join(clauses)} ORDER BY {orders[order]}, i.id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
        entities = self._entities_of([row[0] for row in rows])
        return [StoredItem(*row, entities=tuple(entities.get(row[0], ()))) for row in rows]

    def item_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def _entities_of(self, ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            for item_id, entity in self.conn.execute(
                f"SELECT item_id, entity FROM item_entities WHERE item_id IN ({marks}) ORDER BY rowid", part
            ):
                out.setdefault(item_id, []).append(entity)
        return out

    def alerts(
        self,
        *,
        entity: str | None = None,
        rule: str | None = None,
        start: float | None = None,
        end: float | None = None,
        limit: int = 100,
    ) -> list[Alert]:
        """Alerts, newest window first, optionally for one entity (``'*'``: the overall series) or rule, with
        windows starting in ``[start, end)``."""
        clauses, params = ["window_start >= ?", "window_start < ?"], list(_bounds(start, end))
        if entity is not None:
            clauses.append("entity = ?")
            params.append(entity)
        if rule is not None:
            clauses.append("rule = ?")
            params.append(rule)
        rows = self.conn.execute(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE {' AND '.join(clauses)} "
            "ORDER BY window_start DESC, id DESC LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [_alert(row) for row in rows]

    def alert(self, alert_id: int) -> Alert | None:
        row = self.conn.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else _alert(row)

    def alert_items(self, alert_id: int, *, limit: int = 50, order: str = "most_negative") -> list[StoredItem]:
        """The texts behind an alert: its entity's items in its window, most negative first by default."""
        alert = self.alert(alert_id)
        if alert is None:
            raise TuneforgeError(f"no alert {alert_id} in {self.path}")
        return self.items(entity=alert.entity, start=alert.window_start, end=alert.window_end, order=order, limit=limit)

    def rejected(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """Records that were not stored, newest first, with where they were and why."""
        rows = self.conn.execute(
            "SELECT source, location, reason, item_id, raw, at FROM rejected ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        keys = ("source", "location", "reason", "item_id", "raw", "at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def stats(self) -> dict[str, Any]:
        """Counts for a status line or a health endpoint."""

        def one(sql: str) -> int:
            return int(self.conn.execute(sql).fetchone()[0])

        reasons = dict(
            self.conn.execute("SELECT reason, COUNT(*) FROM rejected GROUP BY reason ORDER BY COUNT(*) DESC")
        )
        return {
            "items": one("SELECT COUNT(*) FROM items"),
            "entities": one("SELECT COUNT(DISTINCT entity) FROM item_entities"),
            "alerts": one("SELECT COUNT(*) FROM alerts"),
            "rejected": sum(reasons.values()),
            "rejected_by_reason": reasons,
            "offsets": dict(self.conn.execute("SELECT source, offset FROM source_offsets")),
            "time_range": self.time_range(),
        }


def _bounds(start: float | None, end: float | None) -> tuple[float, float]:
    """``[start, end)`` with open ends (stored times are never negative)."""
    return (-1.0 if start is None else start, float("inf") if end is None else end)


def _alert(row: Sequence[Any]) -> Alert:
    (alert_id, rule, kind, entity, window, start, end, field_name, value, threshold, message, detail, created) = row
    return Alert(
        rule=rule,
        type=kind,
        entity=entity,
        window=window,
        window_start=start,
        window_end=end,
        field=field_name,
        value=value,
        threshold=threshold,
        message=message,
        detail=json.loads(detail),
        id=alert_id,
        created_at=created,
    )
