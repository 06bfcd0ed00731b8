"""A backtest's output: the alert table, and one plot per alerted entity and window (its mean signed
sentiment, smoothed index, negative share and volume, with the alerted windows marked)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from tuneforge.apps.monitor.aggregate import series
from tuneforge.apps.monitor.config import parse_duration
from tuneforge.apps.monitor.items import OVERALL, iso
from tuneforge.apps.monitor.store import Alert, Store
from tuneforge.files import atomic_write_with


def alert_table(alerts: Sequence[Alert], *, title: str = "alerts") -> Table:
    """The alerts, oldest window first, as a rich table."""
    table = Table(title=title)
    for column in ("window start (UTC)", "window", "entity", "rule", "field", "value", "threshold"):
        table.add_column(column, no_wrap=column != "rule")
    table.add_column("why")
    for alert in sorted(alerts, key=lambda a: (a.window_start, a.entity, a.rule)):
        table.add_row(
            iso(alert.window_start),
            alert.window,
            alert.entity,
            alert.rule,
            alert.field,
            f"{alert.value:.3f}",
            "" if alert.threshold is None else f"{alert.threshold:g}",
            alert.message.split(": ", 1)[-1],
        )
    return table


def _file_name(entity: str, window: str) -> str:
    name = "overall" if entity == OVERALL else re.sub(r"[^\w.-]+", "_", entity).strip("._") or "entity"
    return f"{name}-{window}.png"


def plot_entity(store: Store, entity: str, window: str, alerts: Sequence[Alert], path: Path, *, alpha: float) -> Path:
    """One entity's series for one window size, alerted windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = parse_duration(window)
    windows = series(store, entity, size, alpha=alpha)
    # Values at the middle of their window; bars and shading span the window.
    times = [datetime.fromtimestamp(w.start + size / 2, UTC) for w in windows]
    starts = [datetime.fromtimestamp(w.start, UTC) for w in windows]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 2, 1.3])
    top.plot(times, [w.mean_signed for w in windows], ".", color="0.55", label="mean signed sentiment")
    top.plot(times, [w.index for w in windows], "-", color="tab:blue", label="smoothed index")
    top.axhline(0.0, color="0.8", linewidth=0.8)
    top.set_ylabel("sentiment")
    top.legend(loc="best", fontsize=8)
    middle.plot(times, [w.negative_share for w in windows], ".-", color="tab:red")
    middle.set_ylabel("negative share")
    middle.set_ylim(-0.03, 1.03)
    bottom.bar(starts, [w.volume for w in windows], width=size / 86400 * 0.9, align="edge", color="0.5")
    bottom.set_ylabel("items")
    for alert in alerts:
        start, end = (datetime.fromtimestamp(t, UTC) for t in (alert.window_start, alert.window_end))
        for axis in (top, middle, bottom):
            axis.axvspan(start, end, color="tab:orange", alpha=0.3, linewidth=0)
    shown = "all items" if entity == OVERALL else entity
    top.set_title(f"{shown}, {window} windows: {len(alerts)} alert{'s' if len(alerts) != 1 else ''} (shaded)")
    fig.autofmt_xdate()
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_plots(store: Store, alerts: Sequence[Alert], folder: Path, *, alpha: float) -> list[Path]:
    """One PNG per (entity, window) that raised an alert, in ``folder``."""
    groups: dict[tuple[str, str], list[Alert]] = {}
    for alert in alerts:
        groups.setdefault((alert.entity, alert.window), []).append(alert)
    return [
        plot_entity(store, entity, window, group, folder / _file_name(entity, window), alpha=alpha)
        for (entity, window), group in sorted(groups.items())
    ]
