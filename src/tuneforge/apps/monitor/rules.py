"""Early-warning rules: pure functions of one window and a JSON-able state, folded over a series.

- ``negative_share``: the window's negative share at or over a threshold, with at least ``min_volume`` items.
- ``ewma_zscore``: the window's value against the entity's own trailing baseline, an exponentially weighted
  mean and variance of the earlier windows; fires when ``|z| >= z`` (in the rule's direction) once the
  baseline has ``min_history`` windows.
- ``cusum``: a change-point: the baseline's mean and standard deviation are estimated over ``min_history``
  windows, then the standardised deviations are accumulated (minus the slack ``k``) until one sum passes
  ``h``; after an alarm the baseline is estimated again, in the new regime.

Cooldown: after an alert, the same rule stays quiet for that entity until ``cooldown`` (stream time) has
passed since the end of the alerted window; a suppressed firing still moves the rule's state. Because
state is stored with the data and time is the stream's, a restart or a backtest fires exactly the same
alerts as one uninterrupted run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tuneforge.apps.monitor.aggregate import Window
from tuneforge.apps.monitor.config import CusumRule, EwmaZscoreRule, NegativeShareRule
from tuneforge.apps.monitor.items import OVERALL, iso

AnyRule = NegativeShareRule | EwmaZscoreRule | CusumRule
State = dict[str, Any]


@dataclass(frozen=True)
class Firing:
    """A rule's verdict on one window."""

    value: float
    threshold: float | None
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


def _label(window: Window) -> str:
    entity = "all items" if window.entity == OVERALL else window.entity
    return f"{entity}, window from {iso(window.start)}"


def _judged(rule: AnyRule, window: Window) -> float | None:
    """The window's value, or None when the window is not judged (too few items, or no value)."""
    if window.volume < rule.min_volume:
        return None
    return window.value(rule.field)


def negative_share_step(rule: NegativeShareRule, state: State, window: Window) -> tuple[State, Firing | None]:
    share = _judged(rule, window)
    if share is None or share < rule.threshold:
        return state, None
    return state, Firing(
        share,
        rule.threshold,
        f"{_label(window)}: negative share {share:.2f} >= {rule.threshold:.2f} ({window.volume} items)",
        {"volume": window.volume},
    )


def _direction_ok(direction: str, signed: float) -> bool:
    return direction == "both" or (direction == "up" and signed > 0) or (direction == "down" and signed < 0)


def ewma_zscore_step(rule: EwmaZscoreRule, state: State, window: Window) -> tuple[State, Firing | None]:
    x = _judged(rule, window)
    if x is None:
        return state, None
    n, mean, var = state.get("n", 0), state.get("mean", 0.0), state.get("var", 0.0)
    firing = None
    if n >= rule.min_history:
        std = max(math.sqrt(var), rule.min_std)
        z = (x - mean) / std
        if abs(z) >= rule.z and _direction_ok(rule.direction, z):
            firing = Firing(
                x,
                rule.z,
                f"{_label(window)}: {rule.field} {x:.3f} is {z:+.1f} standard deviations from its baseline "
                f"{mean:.3f} ({window.volume} items)",
                {"z": z, "baseline_mean": mean, "baseline_std": std, "history": n, "volume": window.volume},
            )
    # The baseline takes the window in after judging it (West's exponentially weighted mean and variance).
    if n == 0:
        mean, var = x, 0.0
    else:
        diff = x - mean
        increment = rule.alpha * diff
        mean += increment
        var = (1.0 - rule.alpha) * (var + diff * increment)
    return {"n": n + 1, "mean": mean, "var": var}, firing


def cusum_step(rule: CusumRule, state: State, window: Window) -> tuple[State, Firing | None]:
    x = _judged(rule, window)
    if x is None:
        return state, None
    if "mean" not in state:
        warmup = [*state.get("warmup", []), x]
        if len(warmup) < rule.min_history:
            return {"warmup": warmup}, None
        std = max(statistics.pstdev(warmup), rule.min_std)
        return {"mean": statistics.fmean(warmup), "std": std, "high": 0.0, "low": 0.0}, None
    mean, std = state["mean"], state["std"]
    deviation = (x - mean) / std
    high = max(0.0, state["high"] + deviation - rule.k)
    low = max(0.0, state["low"] - deviation - rule.k)
    turned = None
    if rule.direction in ("up", "both") and high > rule.h:
        turned, statistic = "up", high
    elif rule.direction in ("down", "both") and low > rule.h:
        turned, statistic = "down", low
    if turned is None:
        return {**state, "high": high, "low": low}, None
    firing = Firing(
        x,
        rule.h,
        f"{_label(window)}: {rule.field} shifted {turned} from its baseline {mean:.3f} (CUSUM {statistic:.1f} > "
        f"{rule.h:g}; now {x:.3f}, {window.volume} items)",
        {"direction": turned, "statistic": statistic, "baseline_mean": mean, "baseline_std": std},
    )
    return {"warmup": []}, firing  # a new regime: its baseline is estimated afresh


_STEPS: dict[str, Callable[[Any, State, Window], tuple[State, Firing | None]]] = {
    "negative_share": negative_share_step,
    "ewma_zscore": ewma_zscore_step,
    "cusum": cusum_step,
}


def step(rule: AnyRule, state: State, window: Window, cooldown: float) -> tuple[State, Firing | None]:
    """One window through one rule, with the cooldown; ``state`` is the rule's (``{}`` to start)."""
    inner, firing = _STEPS[rule.type](rule, state.get("rule", {}), window)
    quiet_until = state.get("quiet_until")
    new_state: State = {**state, "rule": inner}
    if firing is None:
        return new_state, None
    if quiet_until is not None and window.start < quiet_until:
        new_state["suppressed"] = state.get("suppressed", 0) + 1
        return new_state, None
    new_state["quiet_until"] = window.end + cooldown
    return new_state, firing


def watches(rule: AnyRule, entity: str) -> bool:
    """Whether ``rule`` judges ``entity``'s series."""
    if entity == OVERALL:
        return rule.overall
    return rule.entities is None or entity in rule.entities


def run_rule(rule: AnyRule, windows: Iterable[Window], cooldown: float = 0.0) -> list[tuple[Window, Firing]]:
    """Every alert ``rule`` raises over a series (for tests and backtests: the live monitor steps the same)."""
    state: State = {}
    fired = []
    for window in windows:
        state, firing = step(rule, state, window, cooldown)
        if firing is not None:
            fired.append((window, firing))
    return fired
