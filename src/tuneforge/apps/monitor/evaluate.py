"""Judging windows as they close: the live side of :mod:`tuneforge.apps.monitor.rules`.

A window closes when the stream's watermark (the newest item's time minus the allowed lateness) passes its
end; no item accepted later can fall into it. Each rule's window size is closed in turn: every entity the
rule watches is stepped through each newly closed window, empty ones included, and the rule state, the
smoothed index and the alerts are written with the batch that closed them (the caller's transaction).
"""

from __future__ import annotations

from collections import defaultdict

from tuneforge.apps.monitor.aggregate import dense, window_start
from tuneforge.apps.monitor.config import MonitorConfig, parse_duration
from tuneforge.apps.monitor.rules import AnyRule, step, watches
from tuneforge.apps.monitor.store import Alert, Store, WindowCounts


class Evaluator:
    def __init__(self, config: MonitorConfig, store: Store) -> None:
        self.store = store
        self.alpha = config.smoothing
        self.cooldown = config.cooldown_seconds
        self.rules: dict[str, list[AnyRule]] = defaultdict(list)
        for rule in config.rules:
            assert rule.window is not None  # the config fills it in
            self.rules[rule.window].append(rule)
        self.sizes = {name: parse_duration(name) for name in self.rules}

    def advance(self, watermark: float) -> list[Alert]:
        """Judge every window that ended by ``watermark``; the new alerts. Call inside ``store.transaction()``."""
        alerts: list[Alert] = []
        for name, rules in self.rules.items():
            size = self.sizes[name]
            alerts += self._close(name, size, rules, window_start(watermark, size))
        return alerts

    def finish(self, last_ts: float) -> list[Alert]:
        """Judge every window up to the one holding ``last_ts`` (the end of a backtest: nothing more will come)."""
        alerts: list[Alert] = []
        for name, rules in self.rules.items():
            size = self.sizes[name]
            alerts += self._close(name, size, rules, window_start(last_ts, size) + size)
        return alerts

    def _close(self, name: str, size: float, rules: list[AnyRule], boundary: float) -> list[Alert]:
        closed = self.store.get_state(f"closed:{name}")
        if closed is not None and boundary <= closed:
            return []
        by_entity: dict[str, list[WindowCounts]] = defaultdict(list)
        for counts in self.store.window_counts(size, start=closed, end=boundary):
            by_entity[counts.entity].append(counts)
        prefix = f"entity:{name}:"
        states = self.store.states(prefix)
        alerts: list[Alert] = []
        for entity in sorted(set(states) | set(by_entity)):
            watching = [rule for rule in rules if watches(rule, entity)]
            if not watching:
                continue
            state = states.get(entity) or {"next": None, "index": None, "rules": {}}
            first = state["next"] if state["next"] is not None else min(c.start for c in by_entity[entity])
            for window in dense(
                entity, by_entity[entity], size, alpha=self.alpha, first=first, stop=boundary, index=state["index"]
            ):
                for rule in watching:
                    rule_state, firing = step(rule, state["rules"].get(rule.name, {}), window, self.cooldown)
                    state["rules"][rule.name] = rule_state
                    if firing is None:
                        continue
                    alert = self.store.insert_alert(
                        Alert(
                            rule=str(rule.name),
                            type=rule.type,
                            entity=entity,
                            window=name,
                            window_start=window.start,
                            window_end=window.end,
                            field=rule.field,
                            value=firing.value,
                            threshold=firing.threshold,
                            message=f"[{rule.name}] {firing.message}",
                            detail=firing.detail,
                        )
                    )
                    if alert is not None:
                        alerts.append(alert)
                state["index"] = window.index
            state["next"] = boundary
            self.store.set_state(prefix + entity, state)
        self.store.set_state(f"closed:{name}", boundary)
        return alerts
