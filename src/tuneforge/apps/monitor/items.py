"""One news item or post, from a raw record (a CSV row, a JSON object) to what the monitor stores.

An item has an id (the record's, else a content hash of its timestamp and text, so that the same post
read twice is the same item), a UTC timestamp, the text, and its entities (from the entity column and
from the alias list). A record that cannot be an item (no timestamp, an unreadable one, no text) is
rejected with a reason, never guessed at.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from tuneforge.apps.monitor.config import ColumnsConfig
from tuneforge.apps.monitor.entities import AliasMatcher, split_entities

# Entity name of the series of all items together.
OVERALL = "*"
# 9999-12-31T23:59:59Z: the last second a timestamp can be written as a date (a later one cannot be shown).
MAX_TIMESTAMP = 253402300799.0


@dataclass(frozen=True)
class Item:
    id: str
    ts: float  # seconds since the epoch, UTC
    text: str
    entities: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejected:
    """A record that is not an item, kept with its reason and where it came from."""

    where: str
    reason: str
    id: str | None = None
    raw: str = ""


@dataclass(frozen=True)
class Record:
    """A raw record from a source: its fields, where it is (for messages), and the source offset just after it
    (``None`` for sources that cannot be resumed, such as stdin or the HTTP API). ``error`` says why the
    source could not read it (bad JSON, a broken CSV row); ``blank`` marks an empty line, which only moves
    the offset."""

    fields: dict[str, Any]
    where: str
    offset: int | None = None
    error: str | None = None
    raw: str = ""
    blank: bool = False


class BadItem(ValueError):
    """Why a record is not an item."""


def parse_timestamp(value: Any, zone: tzinfo) -> float:
    """Seconds since the epoch of an ISO-8601 string (``2024-05-01T09:30:00Z``, ``2024-05-01 09:30``) or a
    number of epoch seconds; a time written without an offset is in ``zone``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadItem("no timestamp")
    if isinstance(value, bool):
        raise BadItem(f"timestamp is not a time: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise BadItem(f"timestamp is not ISO 8601 or epoch seconds: {text[:40]!r}") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=zone)
            seconds = moment.timestamp()
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_TIMESTAMP:
        raise BadItem(f"timestamp out of range: {value!r}")
    return seconds


def content_id(ts: float, text: str) -> str:
    """The id of an item that has none: the same timestamp and text give the same id."""
    digest = hashlib.sha256(f"{ts!r}\n{text}".encode()).hexdigest()
    return f"sha256:{digest[:32]}"


def to_item(record: Record, columns: ColumnsConfig, zone: tzinfo, matcher: AliasMatcher | None) -> Item:
    """The item a record describes, or ``BadItem`` saying what is wrong with it."""
    fields = record.fields
    text = fields.get(columns.text)
    if text is None or not str(text).strip():
        raise BadItem(f"no text (column {columns.text!r})")
    if not isinstance(text, str):
        raise BadItem(f"text is not a string: {type(text).__name__}")
    if columns.timestamp not in fields:
        raise BadItem(f"no timestamp (column {columns.timestamp!r})")
    ts = parse_timestamp(fields[columns.timestamp], zone)
    raw_id = fields.get(columns.id) if columns.id else None
    item_id = str(raw_id).strip() if raw_id is not None and str(raw_id).strip() else content_id(ts, text)
    entities: dict[str, None] = {}
    if columns.entities:
        named = split_entities(fields.get(columns.entities))
        entities.update(dict.fromkeys(matcher.resolve(name) if matcher else name for name in named))
    if matcher:
        entities.update(dict.fromkeys(matcher.find(text)))
    entities.pop(OVERALL, None)
    return Item(id=item_id, ts=ts, text=text, entities=tuple(entities))


def iso(ts: float) -> str:
    """A stored timestamp as ISO 8601 in UTC."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
