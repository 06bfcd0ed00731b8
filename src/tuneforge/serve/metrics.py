"""Prometheus metrics of one app, in its own registry (two apps in one process never mix counts).

With ``--workers N`` each worker process writes its values to files in a shared folder
(prometheus_client's multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR``, which the
server sets before it starts the workers), and a scrape of any worker reads all of them: the counts
are those of the whole server, not of whichever worker answered the scrape.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# prometheus_client reads this variable when it is imported; it must be set before that.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Request latency buckets resolve the 250 ms target and the tail above it.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


def multiprocess_dir() -> str | None:
    """The shared folder of multiprocess mode, or None when this process counts alone."""
    return os.environ.get(MULTIPROC_ENV) or None


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tuneforge_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tuneforge_http_request_duration_seconds",
            "Time from receiving a request to sending its response, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tuneforge_batch_size_texts",
            "Texts per model call (dynamic batches gather texts from concurrent requests)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "tuneforge_batch_inference_seconds",
            "Time the model took for one batch",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Across workers: the texts waiting in all live workers, and ready only when every one is.
        self.queue_depth = Gauge(
            "tuneforge_queue_depth_texts",
            "Texts waiting for the model right now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.texts = Counter("tuneforge_texts_classified", "Texts classified", registry=self.registry)
        self.rejected = Counter(
            "tuneforge_rejected_requests",
            "Requests refused before reaching the model, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "tuneforge_model_ready",
            "1 once the model is loaded and warmed up (in every worker)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type: of all worker processes in multiprocess mode."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        # A fresh registry per scrape, as prometheus_client's documentation asks: the collector reads
        # the files of every worker, this one's included.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def process_exiting(self) -> None:
        """Drop this process's live gauges (queue depth, readiness) from the shared folder."""
        folder = multiprocess_dir()
        if folder is not None:
            multiprocess.mark_process_dead(os.getpid(), path=folder)
