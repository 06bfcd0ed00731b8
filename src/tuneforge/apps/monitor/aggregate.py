"""Per entity (and overall, entity ``'*'``) and per window: volume, negative and positive share, mean signed
sentiment, and a smoothed index (an EWMA of the mean signed sentiment across windows, which an empty
window leaves where it was).

Windows are aligned on the epoch in UTC (``1d`` runs from 00:00 UTC). A series is dense: every window from
the entity's first item on, empty ones with volume 0 and no shares or means.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from tuneforge.apps.monitor.items import iso
from tuneforge.apps.monitor.store import Store, WindowCounts


@dataclass(frozen=True)
class Window:
    entity: str
    start: float
    end: float
    volume: int
    negative_share: float | None
    positive_share: float | None
    mean_signed: float | None
    index: float | None

    def value(self, field: str) -> float | None:
        """The aggregate field a rule watches (a name from config.AGGREGATE_FIELDS)."""
        value = getattr(self, field)
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "start_time": iso(self.start)}


def window_start(ts: float, size: float) -> float:
    """Start of the window holding ``ts``; the same arithmetic as the store's SQL (``CAST(ts / w AS INTEGER)``)."""
    return int(ts / size) * size


def smooth(previous: float | None, mean: float | None, alpha: float) -> float | None:
    """One EWMA step of the index; an empty window (no mean) keeps it."""
    if mean is None:
        return previous
    return mean if previous is None else alpha * mean + (1.0 - alpha) * previous


def make_window(
    entity: str, start: float, size: float, counts: WindowCounts | None, previous_index: float | None, alpha: float
) -> Window:
    """The aggregate of one window from the store's raw sums (``None``: no items in it)."""
    if counts is None or counts.volume == 0:
        return Window(entity, start, start + size, 0, None, None, None, previous_index)
    n = counts.volume
    mean = counts.signed_sum / n
    return Window(
        entity,
        start,
        start + size,
        n,
        counts.negative / n,
        counts.positive / n,
        mean,
        smooth(previous_index, mean, alpha),
    )


def dense(
    entity: str,
    counts: Iterable[WindowCounts],
    size: float,
    *,
    alpha: float,
    first: float,
    stop: float,
    index: float | None = None,
) -> Iterator[Window]:
    """Every window of ``entity`` from ``first`` up to (not including) ``stop``, empty ones included, the index
    carried on from ``index``."""
    by_start = {c.start: c for c in counts if c.entity == entity}
    # Window k starts at k * size, exactly as the store computes it (no drift from adding up floats).
    k = round(first / size)
    while k * size < stop:
        window = make_window(entity, k * size, size, by_start.get(k * size), index, alpha)
        index = window.index
        yield window
        k += 1


def series(
    store: Store,
    entity: str,
    window_seconds: float,
    *,
    alpha: float,
    start: float | None = None,
    end: float | None = None,
) -> list[Window]:
    """The dense series of ``entity`` (``'*'``: all items) for a window size, windows starting in ``[start, end)``
    (default: from its first item to its last). The index is computed from the entity's first window on, so it
    is the same whatever ``start`` a caller asks for."""
    span = store.time_range(entity)
    if span is None:
        return []
    first = window_start(span[0], window_seconds)
    stop = window_start(span[1], window_seconds) + window_seconds if end is None else end
    counts = store.window_counts(window_seconds, entities=[entity], end=stop)
    windows = dense(entity, counts, window_seconds, alpha=alpha, first=first, stop=stop)
    return [w for w in windows if start is None or w.start >= start]
