"""The monitor's YAML, validated before any work like the training config: unknown keys and bad values fail
with a message naming the key (``rules[1] (acme-drop).field: ...``).

Relative paths (the run, the store, the source, the alias file, the JSONL sink) are relative to the config
file's folder, so that a config names the same files from any working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.config import apply_overrides, read_yaml_mapping
from tuneforge.errors import ConfigError

# What a rule may watch: the fields of one window's aggregate (tuneforge.apps.monitor.aggregate.Window).
AGGREGATE_FIELDS = ("volume", "negative_share", "positive_share", "mean_signed", "index")
ROLES = ("positive", "negative", "neutral")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"15m"``, ``"1h"``, ``"1d"``, ``"1w"``; anything else is a ValueError."""
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(f"not a duration like 30s, 15m, 1h, 1d or 1w: {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _duration(value: str, *, positive: bool) -> str:
    seconds = parse_duration(value)
    if positive and seconds <= 0:
        raise ValueError(f"must be longer than zero: {value!r}")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScoringConfig(_Section):
    run: Path = Field(..., description="A run directory: trained, or an optimized variant (ONNX, int8).")
    form: Literal["auto", "model", "adapter", "onnx"] = Field("auto", description="Which saved model to load.")
    batch_size: int = Field(
        64, ge=1, le=4096, description="Texts the model runs together (one padded batch, of similar lengths)."
    )
    chunk_size: int = Field(
        512,
        ge=1,
        le=65536,
        description="Records read, scored and committed together (one transaction). The chunk's texts are sorted "
        "by length and run in batches of batch_size, so a chunk larger than the batch pads little; a quiet "
        "source commits what it holds at once, and an ingest request is always its own chunk.",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for the model; None: all cores.")
    labels: dict[str, Literal["positive", "negative", "neutral"]] | None = Field(
        None,
        description="The run's labels, each given a role (e.g. {bullish: positive}); None: the run's labels must "
        "be named positive, negative and (optionally) neutral. Checked against the run's labels.json at start.",
    )

    @field_validator("labels")
    @classmethod
    def _both_poles(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        if labels is not None:
            missing = [role for role in ("positive", "negative") if role not in labels.values()]
            if missing:
                raise ValueError(f"no label has the role {' or '.join(missing)}; signed sentiment needs both")
        return labels


class StoreConfig(_Section):
    path: Path = Field(Path("monitor.sqlite"), description="SQLite file (created; WAL mode).")


class ColumnsConfig(_Section):
    id: str | None = Field("id", description="Column of the item's id; None or an empty value: a content hash.")
    timestamp: str = "timestamp"
    text: str = "text"
    entities: str | None = Field(
        "entities", description="Column of tickers/companies (a JSON list, or a string split on ; , |); None: none."
    )


class SourceConfig(_Section):
    type: Literal["file", "follow", "stdin"] = Field(
        "file", description="file: read to the end; follow: keep reading as it grows (tail -f); stdin."
    )
    path: Path | None = Field(None, description="The CSV/JSONL file (file and follow).")
    format: Literal["auto", "csv", "jsonl"] = Field("auto", description="auto: from the suffix (stdin: jsonl).")
    encoding: str = "utf-8"
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    timezone: str = Field("UTC", description="IANA zone of timestamps written without an offset.")
    out_of_order: Literal["reject", "accept"] = Field(
        "accept",
        description="reject: an item older than the newest one seen is rejected; accept: accepted when at most "
        "`lateness` older (windows close that much later).",
    )
    lateness: str | None = Field(None, description="accept: how late an item may be (default 15m).")
    max_ahead: str | None = Field(
        "1d",
        description="Reject items stamped further ahead of the clock than this (a typo'd year would make every "
        "later item late); None: no limit (e.g. a backtest of invented future dates).",
    )
    speed: float | None = Field(
        None, gt=0.0, description="Replay pacing: stream seconds per wall second (60: an hour a minute); None: fast."
    )
    poll_interval: float = Field(1.0, gt=0.0, le=3600.0, description="follow: seconds between looks at the file.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r} (an IANA name such as UTC or America/New_York)") from None
        return name

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, name: str) -> str:
        import codecs

        try:
            info = codecs.lookup(name)
        except LookupError:
            raise ValueError(f"unknown encoding {name!r}") from None
        if "\n".encode(info.name) != b"\n":
            raise ValueError(f"{name!r} does not write a newline as one byte; use utf-8 or latin-1")
        return name

    @field_validator("lateness", "max_ahead")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        return None if value is None else _duration(value, positive=False)

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        if self.type in ("file", "follow") and self.path is None:
            raise ValueError(f"source.path: required for source.type {self.type}")
        if self.type == "stdin" and self.path is not None:
            raise ValueError("source.path: not with source.type stdin")
        if self.out_of_order == "reject" and self.lateness is not None and parse_duration(self.lateness) > 0:
            raise ValueError("source.lateness: only with out_of_order accept (reject allows no lateness)")
        return self

    @property
    def lateness_seconds(self) -> float:
        if self.out_of_order == "reject":
            return 0.0
        return parse_duration(self.lateness) if self.lateness is not None else 900.0

    @property
    def max_ahead_seconds(self) -> float | None:
        return None if self.max_ahead is None else parse_duration(self.max_ahead)

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if self.path is None:
            return "jsonl"
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise ConfigError(f"source.format: cannot tell from {self.path.name}; set it to csv or jsonl")
        return suffix[1:]


class EntitiesConfig(_Section):
    aliases: dict[str, str] = Field(
        default_factory=dict, description="Name or alias -> entity (ticker), e.g. {Acme Corp: ACME}."
    )
    alias_file: Path | None = Field(None, description="More aliases: .csv (alias,entity) or .yaml/.json mapping.")
    case_sensitive: bool | Literal["auto"] = Field(
        "auto", description="auto: all-capital aliases (tickers) match case-sensitively, others in any case."
    )
    match_entity_names: bool = Field(True, description="Each entity's own name (ticker) is an alias too.")


class WebhookConfig(_Section):
    url: str
    timeout: float = Field(5.0, gt=0.0, le=300.0, description="Seconds per attempt.")
    retries: int = Field(3, ge=0, le=20, description="Attempts after the first, with exponential backoff.")
    backoff: float = Field(0.5, ge=0.0, le=60.0, description="Seconds before the first retry; doubles each time.")
    max_backoff: float = Field(30.0, ge=0.0, le=3600.0)
    queue_size: int = Field(1000, ge=1, le=1_000_000, description="Alerts waiting; when full the oldest is dropped.")
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"not an http(s) URL: {url!r}")
        return url


class SinksConfig(_Section):
    stdout: bool = True
    jsonl: Path | None = Field(None, description="Append each alert as one JSON line.")
    webhook: WebhookConfig | None = None


Direction = Literal["up", "down", "both"]


class _Rule(_Section):
    name: str | None = Field(None, description="Unique; default: type:field:window.")
    window: str | None = Field(None, description="One of `windows`; None: the first.")
    entities: list[str] | None = Field(None, description="Entities the rule watches; None: all.")
    overall: bool = Field(True, description="Also watch all items together (entity '*').")
    min_volume: int = Field(1, ge=0, description="Windows with fewer items are not judged.")


class NegativeShareRule(_Rule):
    type: Literal["negative_share"]
    threshold: float = Field(..., gt=0.0, le=1.0)
    min_volume: int = Field(10, ge=0)

    @property
    def field(self) -> str:
        return "negative_share"


class EwmaZscoreRule(_Rule):
    type: Literal["ewma_zscore"]
    field: str = "mean_signed"
    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="Weight of each new window in the baseline.")
    z: float = Field(3.0, gt=0.0)
    min_history: int = Field(12, ge=2, description="Windows of baseline before the rule may fire.")
    direction: Direction = "both"
    min_std: float = Field(0.01, gt=0.0, description="Floor on the baseline's standard deviation.")


class CusumRule(_Rule):
    type: Literal["cusum"]
    field: str = "mean_signed"
    k: float = Field(0.5, ge=0.0, description="Slack, in baseline standard deviations.")
    h: float = Field(5.0, gt=0.0, description="Decision threshold, in baseline standard deviations.")
    min_history: int = Field(12, ge=2, description="Windows that estimate the baseline (again after each alarm).")
    direction: Direction = "both"
    min_std: float = Field(0.01, gt=0.0)


Rule = Annotated[NegativeShareRule | EwmaZscoreRule | CusumRule, Field(discriminator="type")]


class MonitorConfig(_Section):
    scoring: ScoringConfig
    store: StoreConfig = Field(default_factory=StoreConfig)
    source: SourceConfig = Field(default_factory=lambda: SourceConfig(type="stdin"))
    entities: EntitiesConfig = Field(default_factory=EntitiesConfig)
    windows: list[str] = Field(default_factory=lambda: ["1h", "1d"], min_length=1)
    smoothing: float = Field(0.3, gt=0.0, le=1.0, description="EWMA weight of each window in the smoothed index.")
    cooldown: str = Field("6h", description="After an alert, the same rule and entity stay quiet this long.")
    rules: list[Rule] = Field(default_factory=list)
    sinks: SinksConfig = Field(default_factory=SinksConfig)

    @field_validator("windows")
    @classmethod
    def _windows(cls, windows: list[str]) -> list[str]:
        cleaned = [_duration(w, positive=True) for w in windows]
        seconds = [parse_duration(w) for w in cleaned]
        if len(set(seconds)) != len(seconds):
            raise ValueError(f"the same window twice: {windows}")
        return cleaned

    @field_validator("cooldown")
    @classmethod
    def _cooldown(cls, value: str) -> str:
        return _duration(value, positive=False)

    @model_validator(mode="after")
    def _rules_fit(self) -> MonitorConfig:
        seconds = {parse_duration(w): w for w in self.windows}
        names: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            where = f"rules[{i}]" + (f" ({rule.name})" if rule.name else "")
            if rule.field not in AGGREGATE_FIELDS:
                raise ValueError(
                    f"{where}.field: {rule.field!r} is not an aggregate field (allowed: {', '.join(AGGREGATE_FIELDS)})"
                )
            if rule.window is None:
                rule.window = self.windows[0]
            else:
                try:
                    window = seconds[parse_duration(rule.window)]
                except (ValueError, KeyError):
                    raise ValueError(
                        f"{where}.window: {rule.window!r} is not one of windows ({', '.join(self.windows)})"
                    ) from None
                rule.window = window
            if rule.name is None:
                rule.name = f"{rule.type}:{rule.field}:{rule.window}"
            if rule.name in names:
                raise ValueError(
                    f"{where}.name: {rule.name!r} is also rules[{names[rule.name]}]'s name; give each rule its own"
                )
            names[rule.name] = i
        return self

    @property
    def cooldown_seconds(self) -> float:
        return parse_duration(self.cooldown)


def _where(loc: tuple[Any, ...], raw: Any) -> str:
    """``rules[1] (acme-drop).z`` for pydantic's ``('rules', 1, 'ewma_zscore', 'z')``."""
    parts: list[str] = []
    node = raw
    rule_types = {"negative_share", "ewma_zscore", "cusum"}
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1] = f"{parts[-1]}[{part}]" if parts else f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if loc[:1] == ("rules",) and isinstance(node, dict) and node.get("name"):
                parts[-1] += f" ({node['name']})"
            continue
        if i > 0 and loc[0] == "rules" and part in rule_types and isinstance(loc[i - 1], int):
            continue  # the discriminated union's tag, not a key the user wrote
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts).replace(".[", "[")


def _format(error: ValidationError, raw: dict[str, Any]) -> str:
    problems = []
    for item in error.errors():
        key = _where(tuple(item["loc"]), raw) or "(config)"
        kind = item["type"]
        if kind == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        elif kind == "missing":
            problems.append(f"{key}: required key is missing")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            problems.append(f"{key}.type: must be one of negative_share, ewma_zscore, cusum")
        else:
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            if key == "(config)" or isinstance(value, dict):
                problems.append(message if key == "(config)" else f"{key}: {message}")
            else:
                problems.append(f"{key}: {message} (got {value!r})")
    return "; ".join(problems)


_PATHS = (("scoring", "run"), ("store", "path"), ("source", "path"), ("entities", "alias_file"), ("sinks", "jsonl"))


def validate_monitor_config(raw: dict[str, Any], base_dir: Path | None = None) -> MonitorConfig:
    """Validate a raw dict; relative paths are taken from ``base_dir`` (the YAML's folder)."""
    try:
        config = MonitorConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(exc, raw)) from None
    if base_dir is not None:
        for section, key in _PATHS:
            owner = getattr(config, section)
            path = getattr(owner, key)
            if path is not None and not path.is_absolute():
                setattr(owner, key, base_dir / path)
    return config


def load_monitor_config(path: Path | str, overrides: list[str] | None = None) -> MonitorConfig:
    """Read a monitor YAML, apply ``--set key=value`` overrides and validate it."""
    path = Path(path)
    raw = read_yaml_mapping(path, what="the monitor config must be a mapping of sections (scoring, source, rules, ...)")
    # Paths written in the file are relative to the file; those given with --set, to the working directory.
    base_dir = path.parent.absolute()
    for section, key in _PATHS:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and not Path(node[key]).is_absolute():
            node[key] = str(base_dir / node[key])
    raw = apply_overrides(raw, overrides or [])
    try:
        return validate_monitor_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
