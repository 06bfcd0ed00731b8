"""What a server is configured with, validated once with messages that name the CLI option."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tuneforge.errors import TuneforgeError

API_KEY_ENV = "TUNEFORGE_API_KEY"
# Worker processes started by uvicorn rebuild the app from this variable (the API key travels
# separately, in API_KEY_ENV, so that it never shows in a process listing or a settings dump).
SETTINGS_ENV = "TUNEFORGE_SERVE_SETTINGS"
FORMS = ("auto", "model", "adapter", "onnx")


@dataclass(frozen=True)
class ServeSettings:
    run_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_batch_size: int = 32  # texts per model call, counted over all requests in the batch
    max_wait_ms: float = 1.0  # how long the oldest waiting text may wait for company
    max_queue: int = 1024  # texts waiting for the model; more is answered with 503 + Retry-After
    max_texts_per_request: int = 64
    max_chars: int = 2000  # per text
    truncate: bool = False  # cut over-long texts instead of answering 413
    max_body_bytes: int | None = None  # None: derived from the two limits above
    api_key: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    form: str = "auto"
    threads: int | None = None  # torch/ONNX Runtime threads; None: the library default
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0  # graceful shutdown: how long queued work may take to finish
    log_level: str = "info"

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))

    def validate(self) -> ServeSettings:
        """Return self, or raise a ``TuneforgeError`` naming the offending option."""
        checks: list[tuple[str, bool, str]] = [
            ("--port", 0 <= self.port <= 65535, "must be in 0..65535"),
            ("--workers", self.workers >= 1, "must be at least 1"),
            ("--max-batch-size", self.max_batch_size >= 1, "must be at least 1"),
            ("--max-wait-ms", 0 <= self.max_wait_ms <= 10_000, "must be in 0..10000"),
            ("--max-texts", self.max_texts_per_request >= 1, "must be at least 1"),
            ("--max-chars", self.max_chars >= 1, "must be at least 1"),
            (
                "--max-queue",
                self.max_queue >= self.max_texts_per_request,
                f"must be at least --max-texts ({self.max_texts_per_request}), or a full request could never fit",
            ),
            ("--form", self.form in FORMS, f"must be one of {', '.join(FORMS)}"),
            ("--threads", self.threads is None or self.threads >= 1, "must be at least 1"),
            ("--api-key", self.api_key is None or len(self.api_key) >= 8, "must be at least 8 characters"),
        ]
        for option, ok, message in checks:
            if not ok:
                raise TuneforgeError(f"{option}: {message}")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise TuneforgeError(f"--cors-origin: {origin!r} is not an origin like https://example.com (or *)")
        return self

    @property
    def body_limit(self) -> int:
        """Largest request body accepted, so a huge upload is refused before it is read."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        # A JSON-escaped character takes at most 6 bytes (\\uXXXX); truncation accepts longer texts.
        per_text = self.max_chars * (60 if self.truncate else 6) + 64
        return 64 * 1024 + self.max_texts_per_request * per_text

    def to_env(self) -> dict[str, str]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        data.pop("api_key")
        env = {SETTINGS_ENV: json.dumps(data)}
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
        return env

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise TuneforgeError(f"{SETTINGS_ENV} is not set; start the server with `tuneforge serve RUN_DIR`")
        data = json.loads(raw)
        data["run_dir"] = Path(data["run_dir"])
        data["cors_origins"] = tuple(data.get("cors_origins", ()))
        return replace(cls(**data), api_key=os.environ.get(API_KEY_ENV) or None)
