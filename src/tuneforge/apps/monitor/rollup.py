"""Window sums added up as items are stored, so that a dashboard reads a year of a busy stream in milliseconds.

Per entity (and ``'*'``, all items) and per bucket of a minute, an hour and a day (aligned on the epoch, UTC,
as the windows are): the item count, the negative and positive counts, the sum of signed sentiment and the
first and last item time. Bucket size 0 holds each entity's all-time totals (the entity list). The sums are
updated in the transaction that stores the items (one upsert per entity and bucket a batch touches), and
built from the items once when a store made before them is opened for writing.

A window that is a whole number of buckets (15m, 1h, 6h, 1d; not 90s) is read from the largest bucket that
divides it: at most span / bucket rows per entity, however many items there are. The rules never read
these sums (they add up the items themselves): a sum added batch by batch may differ from one added at once
in the last bit, and an alert must not depend on how the stream was batched.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from tuneforge.apps.monitor.items import OVERALL

# Bucket sizes in seconds, smallest first; 0 is the all-time total.
LEVELS = (60, 3600, 86400)
TOTAL = 0
# Written to the store's meta table once the sums cover every stored item; a reader falls back to the items
# while it is absent (a store no writer of this version has opened yet).
VERSION = "1"
_META_KEY = "rollup"

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollup (
    size INTEGER NOT NULL,
    entity TEXT NOT NULL,
    start REAL NOT NULL,
    volume INTEGER NOT NULL,
    negative INTEGER NOT NULL,
    positive INTEGER NOT NULL,
    signed_sum REAL NOT NULL,
    first_ts REAL NOT NULL,
    last_ts REAL NOT NULL,
    PRIMARY KEY (size, entity, start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_size_start ON rollup (size, start);
"""

_UPSERT = (
    "INSERT INTO rollup VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (size, entity, start) DO UPDATE SET "
    "volume = volume + excluded.volume, negative = negative + excluded.negative, "
    "positive = positive + excluded.positive, signed_sum = signed_sum + excluded.signed_sum, "
    "first_ts = MIN(first_ts, excluded.first_ts), last_ts = MAX(last_ts, excluded.last_ts)"
)
_SUMS = "COUNT(*), SUM(i.sentiment = 'negative'), SUM(i.sentiment = 'positive'), SUM(i.signed), MIN(i.ts), MAX(i.ts)"


def bucket(ts: float, size: int) -> float:
    """Start of the bucket holding ``ts``: the store's ``CAST(ts / size AS INTEGER) * size``."""
    return float(int(ts / size) * size) if size else 0.0


def ensure(conn: sqlite3.Connection) -> None:
    """Create the table and, for a store whose items it does not cover yet, add them all up (once)."""
    conn.executescript(SCHEMA)
    if ready(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM rollup")
        for size in (TOTAL, *LEVELS):
            start = f"CAST(i.ts / {size} AS INTEGER) * {size}" if size else "0"
            conn.execute(
                f"INSERT INTO rollup SELECT {size}, ?, {start} AS b, {_SUMS} FROM items i GROUP BY b", (OVERALL,)
            )
            conn.execute(
                f"INSERT INTO rollup SELECT {size}, e.entity, {start} AS b, {_SUMS} "
                "FROM item_entities e JOIN items i ON i.id = e.item_id GROUP BY e.entity, b"
            )
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_META_KEY, VERSION))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def ready(conn: sqlite3.Connection) -> bool:
    """Whether the sums cover every stored item (else read the items)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_KEY,)).fetchone()
    except sqlite3.OperationalError:  # a store from before the meta table: cannot happen past schema 1
        return False
    return row is not None and row[0] == VERSION


def add(conn: sqlite3.Connection, items: Iterable[tuple[Sequence[str], float, str, float]]) -> None:
    """Add newly stored items, each ``(entities, ts, sentiment, signed)``, to the sums (inside the transaction
    that stores them)."""
    sums: dict[tuple[int, str, float], list[Any]] = {}
    for entities, ts, sentiment, signed in items:
        negative, positive = int(sentiment == "negative"), int(sentiment == "positive")
        for entity in (OVERALL, *entities):
            for size in (TOTAL, *LEVELS):
                key = (size, entity, bucket(ts, size))
                row = sums.get(key)
                if row is None:
                    sums[key] = [1, negative, positive, signed, ts, ts]
                else:
                    row[0] += 1
                    row[1] += negative
                    row[2] += positive
                    row[3] += signed
                    row[4] = min(row[4], ts)
                    row[5] = max(row[5], ts)
    conn.executemany(_UPSERT, [(*key, *row) for key, row in sums.items()])


def level_for(window_seconds: float) -> int | None:
    """The largest bucket a window is a whole number of (None: read the items)."""
    for size in reversed(LEVELS):
        if window_seconds >= size and window_seconds % size == 0:
            return size
    return None


def window_sums(
    conn: sqlite3.Connection,
    window_seconds: float,
    *,
    entities: Sequence[str] | None,
    start: float | None,
    end: float | None,
) -> list[tuple[str, float, int, int, int, float]] | None:
    """Per entity and window in ``[start, end)``: ``(entity, window start, volume, negative, positive, signed
    sum)``, only windows with items; ``entities`` None: every entity and ``'*'``. None when the sums cannot
    answer exactly (not built, a window or a bound that is not a whole number of buckets): read the items."""
    size = level_for(window_seconds)
    if size is None or not ready(conn):
        return None
    if any(bound is not None and bound % size != 0 for bound in (start, end)):
        return None
    params: dict[str, Any] = {"size": size, "w": window_seconds}
    clauses = ["size = :size"]
    if start is not None:
        clauses.append("start >= :lo")
        params["lo"] = start
    if end is not None:
        clauses.append("start < :hi")
        params["hi"] = end
    if entities is not None:
        wanted = list(dict.fromkeys(entities))
        if not wanted:
            return []
        clauses.append(f"entity IN ({','.join(f':e{i}' for i in range(len(wanted)))})")
        params.update({f"e{i}": name for i, name in enumerate(wanted)})
    rows = conn.execute(
        "SELECT entity, CAST(start / :w AS INTEGER) AS b, SUM(volume), SUM(negative), SUM(positive), "
        f"SUM(signed_sum) FROM rollup WHERE {' AND '.join(clauses)} GROUP BY entity, b ORDER BY entity, b",
        params,
    )
    return [(entity, b * window_seconds, n, neg, pos, s) for entity, b, n, neg, pos, s in rows]


def totals(conn: sqlite3.Connection) -> list[tuple[str, int, float, float]] | None:
    """Every entity (``'*'`` included) with its item count and first and last item times, busiest first; None
    when the sums are not built."""
    if not ready(conn):
        return None
    rows = conn.execute(
        "SELECT entity, volume, first_ts, last_ts FROM rollup WHERE size = ? ORDER BY volume DESC, entity", (TOTAL,)
    )
    return [(entity, int(volume), float(first), float(last)) for entity, volume, first, last in rows]
