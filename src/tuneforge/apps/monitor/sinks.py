"""Where alerts go: stdout, a JSONL file, a webhook.

Delivery is at least once: an alert is marked dispatched in the store after the sinks took it, and a
monitor restarted in between hands it over again. The JSONL sink skips an alert whose key it already
holds; a webhook receiver can de-duplicate on the ``Idempotency-Key`` header (the alert's key).

The webhook never stalls ingest: ``send`` only puts the alert on a bounded queue (when full, the oldest
waiting alert is dropped and counted); a background thread POSTs it, retrying timeouts, connection
errors, 408, 429 and 5xx with exponential backoff, and gives up after ``retries``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from tuneforge.apps.monitor.config import SinksConfig, WebhookConfig
from tuneforge.apps.monitor.store import Alert

_RETRY_STATUS = {408, 429}


class Sink(Protocol):
    def send(self, alert: Alert) -> None: ...

    def close(self, timeout: float = 10.0) -> None: ...


class StdoutSink:
    """One line per alert, for an analyst watching the terminal."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def send(self, alert: Alert) -> None:
        stream = self.stream or sys.stdout
        print(f"ALERT {alert.message}", file=stream, flush=True)

    def close(self, timeout: float = 10.0) -> None:
        pass


class JsonlSink:
    """Appends each alert as one JSON line, flushed to disk; an alert already in the file is not written again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: set[str] = set()
        if self.path.is_file():
            with self.path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        self.keys.add(json.loads(line)["key"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by a crash: its alert is written again
        self.handle = self.path.open("a", encoding="utf-8")

    def send(self, alert: Alert) -> None:
        if alert.key in self.keys:
            return
        self.handle.write(json.dumps(alert.to_dict(), ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.keys.add(alert.key)

    def close(self, timeout: float = 10.0) -> None:
        self.handle.close()


class WebhookSink:
    """POSTs alerts as JSON from a background thread; see the module docstring for the guarantees."""

    def __init__(self, config: WebhookConfig, *, warn: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        self.queue: deque[Alert] = deque()
        self.condition = threading.Condition()
        self.closing = False
        self.in_flight = False
        self.sent = self.failed = self.dropped = self.retried = 0
        self.thread = threading.Thread(target=self._work, name="monitor-webhook", daemon=True)
        self.thread.start()

    def send(self, alert: Alert) -> None:
        """Queue ``alert``; never waits on the network."""
        with self.condition:
            if len(self.queue) >= self.config.queue_size:
                self.queue.popleft()
                self.dropped += 1
            self.queue.append(alert)
            self.condition.notify()

    def pending(self) -> int:
        """Alerts waiting or being delivered."""
        with self.condition:
            return len(self.queue) + int(self.in_flight)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop (what is left is counted as dropped)."""
        deadline = time.monotonic() + timeout
        with self.condition:
            while (self.queue or self.in_flight) and time.monotonic() < deadline:
                self.condition.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            self.closing = True
            self.dropped += len(self.queue)
            self.queue.clear()
            self.condition.notify_all()
        self.thread.join(timeout=max(0.0, deadline - time.monotonic()) + self.config.timeout)

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped, "retried": self.retried}

    def _work(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.closing:
                    self.condition.wait()
                if self.closing:
                    return
                alert = self.queue.popleft()
                self.in_flight = True
            delivered = self._deliver(alert)
            with self.condition:
                self.in_flight = False
                if delivered:
                    self.sent += 1
                else:
                    self.failed += 1
                self.condition.notify_all()

    def _deliver(self, alert: Alert) -> bool:
        body = json.dumps(alert.to_dict(), ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.key, **self.config.headers}
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.retried += 1
                pause = min(self.config.backoff * 2 ** (attempt - 1), self.config.max_backoff)
                with self.condition:
                    if self.condition.wait_for(lambda: self.closing, timeout=pause):
                        return False
            problem = self._post(body, headers)
            if problem is None:
                return True
            if not problem[1]:
                break
        self.warn(f"webhook {self.config.url}: alert {alert.key} not delivered ({problem[0]})")
        return False

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[str, bool] | None:
        """``None`` when delivered; else the problem and whether trying again could help."""
        request = urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                response.read()
            return None
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}", exc.code >= 500 or exc.code in _RETRY_STATUS
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}", True


class Sinks:
    """All configured sinks; one failing (a full disk, a broken pipe) never stops the monitor."""

    def __init__(self, sinks: list[Sink], *, warn: Callable[[str], None] | None = None) -> None:
        self.sinks = sinks
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))

    def send(self, alert: Alert) -> None:
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception as exc:  # a sink's failure must not lose the next batch
                self.warn(f"{type(sink).__name__}: alert {alert.key} not written ({exc})")

    def close(self, timeout: float = 10.0) -> None:
        for sink in self.sinks:
            try:
                sink.close(timeout)
            except Exception as exc:
                self.warn(f"{type(sink).__name__}: not closed cleanly ({exc})")

    def webhook(self) -> WebhookSink | None:
        return next((sink for sink in self.sinks if isinstance(sink, WebhookSink)), None)


def build_sinks(config: SinksConfig, *, stdout: IO[str] | None = None) -> Sinks:
    sinks: list[Sink] = []
    if config.stdout:
        sinks.append(StdoutSink(stdout))
    if config.jsonl is not None:
        sinks.append(JsonlSink(config.jsonl))
    if config.webhook is not None:
        sinks.append(WebhookSink(config.webhook))
    return Sinks(sinks)
