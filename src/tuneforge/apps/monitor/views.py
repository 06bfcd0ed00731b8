"""What the dashboard and its API read from a store: the entity list with sparklines, one entity's series with
its alerts, counts. Each answer reads a bounded number of rows whatever the number of items: the entity list
and the series come from the window sums of :mod:`tuneforge.apps.monitor.rollup` (from the items themselves
when a store has none yet, or for a window that is not a whole number of minutes), alerts and an alert's
texts from indexed ranges (an entity's items by time, alerts by window start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.apps.monitor import rollup
from tuneforge.apps.monitor.aggregate import Window, dense, window_start
from tuneforge.apps.monitor.items import OVERALL, iso
from tuneforge.apps.monitor.store import EntitySummary, Store, WindowCounts


@dataclass(frozen=True)
class ItemText:
    """One stored item's text and the model's answer, for an explanation."""

    id: str
    text: str
    label: str


def window_counts(
    store: Store,
    window_seconds: float,
    *,
    entities: list[str] | None = None,
    start: float | None = None,
    end: float | None = None,
) -> list[WindowCounts]:
    """:meth:`Store.window_counts`, read from the window sums when they can answer."""
    sums = rollup.window_sums(store.conn, window_seconds, entities=entities, start=start, end=end)
    if sums is None:
        return store.window_counts(window_seconds, entities=entities, start=start, end=end)
    return [WindowCounts(*row) for row in sums]


def entity_summaries(store: Store) -> list[EntitySummary]:
    """Every entity, busiest first, ``'*'`` (all items) first of all."""
    rows = rollup.totals(store.conn)
    if rows is None:
        summaries = store.entities()
        span = store.time_range()
        if span is not None:
            summaries.insert(0, EntitySummary(OVERALL, store.item_count(), *span))
        return summaries
    summaries = [EntitySummary(*row) for row in rows]
    return sorted(summaries, key=lambda s: s.entity != OVERALL)  # stable: the rest stay busiest first


def alert_counts(store: Store) -> dict[str, tuple[int, float]]:
    """Per entity: how many alerts, and the start of the latest alerted window."""
    rows = store.conn.execute("SELECT entity, COUNT(*), MAX(window_start) FROM alerts GROUP BY entity")
    return {entity: (int(n), float(latest)) for entity, n, latest in rows}


def axis(store: Store, window_seconds: float, points: int) -> list[float]:
    """Starts of the last ``points`` windows, up to the one holding the newest item (empty: no items)."""
    span = store.time_range()
    if span is None:
        return []
    last = window_start(span[1], window_seconds)
    return [last - (points - 1 - k) * window_seconds for k in range(points)]


def overview(store: Store, window_seconds: float, *, points: int, limit: int) -> dict[str, Any]:
    """The busiest ``limit`` entities (and ``'*'``) with their totals, alert counts and a sparkline each: volume
    and mean signed sentiment (None: no items) in the last ``points`` windows, on one time axis for all."""
    starts = axis(store, window_seconds, points)
    summaries = entity_summaries(store)
    shown = summaries[: limit + 1] if summaries and summaries[0].entity == OVERALL else summaries[:limit]
    counts: dict[tuple[str, float], WindowCounts] = {}
    if starts:
        rows = window_counts(
            store,
            window_seconds,
            entities=[s.entity for s in shown],
            start=starts[0],
            end=starts[-1] + window_seconds,
        )
        counts = {(c.entity, c.start): c for c in rows}
    alerts = alert_counts(store)
    entities = []
    for summary in shown:
        volume, mean = [], []
        for start in starts:
            c = counts.get((summary.entity, start))
            volume.append(c.volume if c else 0)
            mean.append(round(c.signed_sum / c.volume, 6) if c and c.volume else None)
        alerted, latest = alerts.get(summary.entity, (0, None))
        entities.append(
            {
                "entity": summary.entity,
                "volume": summary.volume,
                "first_time": iso(summary.first_ts),
                "last_time": iso(summary.last_ts),
                "alerts": alerted,
                "latest_alert_time": None if latest is None else iso(latest),
                "sparkline": {"volume": volume, "mean_signed": mean},
            }
        )
    return {
        "starts": [iso(start) for start in starts],
        "entities": entities,
        "total_entities": sum(1 for s in summaries if s.entity != OVERALL),
    }


def series(
    store: Store, entity: str, window_seconds: float, *, alpha: float, points: int | None = None
) -> list[Window]:
    """The last ``points`` windows (None: all) of ``entity``'s dense series, as
    :func:`tuneforge.apps.monitor.aggregate.series` computes it (the index carried from its first window)."""
    span = store.time_range(entity)
    if span is None:
        return []
    first = window_start(span[0], window_seconds)
    stop = window_start(span[1], window_seconds) + window_seconds
    counts = window_counts(store, window_seconds, entities=[entity], end=stop)
    windows = list(dense(entity, counts, window_seconds, alpha=alpha, first=first, stop=stop))
    return windows if points is None else windows[-points:]


def item_text(store: Store, item_id: str) -> ItemText | None:
    row = store.conn.execute("SELECT id, text, label FROM items WHERE id = ?", (item_id,)).fetchone()
    return None if row is None else ItemText(*row)


def stats(store: Store) -> dict[str, Any]:
    """Counts for the dashboard's header: items, entities, alerts, rejected records, the time range."""
    rows = rollup.totals(store.conn)
    if rows is None:
        items = store.item_count()
        entities = len(store.entities())
    else:
        items = next((volume for entity, volume, _, _ in rows if entity == OVERALL), 0)
        entities = sum(1 for entity, *_ in rows if entity != OVERALL)
    span = store.time_range()
    return {
        "items": items,
        "entities": entities,
        "alerts": int(store.conn.execute("SELECT COUNT(*) FROM alerts").fetchone()[0]),
        "rejected": int(store.conn.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]),
        "first_time": None if span is None else iso(span[0]),
        "last_time": None if span is None else iso(span[1]),
    }
