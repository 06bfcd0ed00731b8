"""What a server is configured with, validated once with messages that name the CLI option."""

from __future__ import annotations

import ipaddress
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
DEVICES = ("cpu", "cuda", "auto")  # as tuneforge.models.runs.DEVICES (not imported: the settings load light)
# With --truncate a text may be this many times --max-chars long before it is refused: it is cut
# anyway, and the bound keeps the work per request (and the body size limit) finite.
TRUNCATE_FACTOR = 10
# Bytes a character can take in a JSON body at worst: an escaped pair of surrogates (\ud83d\ude00).
_JSON_BYTES_PER_CHAR = 12


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
    truncate: bool = False  # cut over-long texts (up to TRUNCATE_FACTOR x max_chars) instead of a 422
    max_body_bytes: int | None = None  # None: derived from the two limits above
    api_key: str | None = field(default=None, repr=False)
    public_docs: bool = False  # with an API key: the playground, /docs and /openapi.json stay open
    cors_origins: tuple[str, ...] = ()
    root_path: str = ""  # the prefix a reverse proxy serves the app under (it strips it), e.g. /api
    form: str = "auto"
    threads: int | None = None  # torch/ONNX Runtime threads; None: the library default
    device: str = "cpu"  # cpu, cuda or auto (the GPU when there is one)
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0  # graceful shutdown: how long queued work may take to finish
    request_timeout_s: float = 30.0  # a request's time in the queue and the model, at most
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
            ("--device", self.device in DEVICES, f"must be one of {', '.join(DEVICES)}"),
            ("--api-key", self.api_key is None or len(self.api_key) >= 8, "must be at least 8 characters"),
            ("--drain-timeout", 0 < self.drain_timeout_s <= 3600, "must be in (0, 3600] seconds"),
            ("--request-timeout", 0 < self.request_timeout_s <= 3600, "must be in (0, 3600] seconds"),
        ]
        for option, ok, message in checks:
            if not ok:
                raise TuneforgeError(f"{option}: {message}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise TuneforgeError(
                f"--root-path: {self.root_path!r} is not a path like /api (a leading /, no trailing /)"
            )
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise TuneforgeError(f"--cors-origin: {origin!r} is not an origin like https://example.com (or *)")
        return self

    @property
    def text_limit(self) -> int:
        """Characters a text may have in a request (the schema's maxLength)."""
        return self.max_chars * (TRUNCATE_FACTOR if self.truncate else 1)

    @property
    def body_limit(self) -> int:
        """Largest request body accepted, so a huge upload is refused before it is read.

        Derived from the schema's limits, so that every request the schema allows fits.
        """
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        per_text = self.text_limit * _JSON_BYTES_PER_CHAR + 64
        return 64 * 1024 + self.max_texts_per_request * per_text

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can connect (``--host`` is a loopback address)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: it may resolve to any interface
            return False

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


def read_api_key_file(path: Path) -> str:
    """The key in ``path`` (``--api-key-file``): its first line, without surrounding whitespace.

    A file keeps the key out of the command line, which every user of the machine can read (``ps``).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuneforgeError(f"--api-key-file: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TuneforgeError(f"--api-key-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise TuneforgeError(f"--api-key-file: {path} is empty")
    return lines[0].strip()


def resolve_api_key(given: str | None, key_file: Path | None) -> str | None:
    """The key a server requires: ``--api-key``, else the one in ``--api-key-file``, else ``TUNEFORGE_API_KEY``;
    None (no key) when none is set. Both options at once is an error: which one was meant is a guess."""
    if given and key_file:
        raise TuneforgeError("--api-key-file: give the key once, either it or --api-key")
    key = given or (read_api_key_file(key_file) if key_file else None)
    return key or os.environ.get(API_KEY_ENV) or None
