"""Where items come from: a CSV/JSONL file (read from a byte offset, so a restart resumes exactly where the
store's checkpoint says), the same file followed as it grows (``tail -f``), or stdin.

A source yields ``Record``s, and ``None`` when it has nothing for now (a followed file that has not grown,
a quiet stdin), so that the runner can commit what it holds instead of waiting. A line still being
written (no newline yet) is left for the next look; a CSV record whose quoted text spans lines is read
whole. A record that is not valid CSV/JSON is passed on with its error, to be rejected with its reason.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from tuneforge.apps.monitor.items import Record
from tuneforge.errors import DataError

_BOM = b"\xef\xbb\xbf"
_STDIN_IDLE_SECONDS = 1.0


def _parse_csv_record(text: str) -> list[str]:
    rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    if len(rows) != 1:
        raise ValueError("not one CSV record")
    return rows[0]


class _Parser:
    """Turns the bytes of one record into a ``Record``: JSON lines, or CSV rows under a header."""

    def __init__(self, fmt: str, encoding: str, label: str) -> None:
        self.fmt, self.encoding, self.label = fmt, encoding, label
        self.header: list[str] | None = None

    def complete(self, chunk: bytes) -> bool:
        # A CSV record ends at a newline outside quotes: where the number of quote characters so far is even.
        return self.fmt != "csv" or chunk.count(b'"') % 2 == 0

    def set_header(self, chunk: bytes) -> None:
        try:
            header = _parse_csv_record(chunk.decode(self.encoding))
        except (UnicodeDecodeError, ValueError, csv.Error) as exc:
            raise DataError(f"{self.label}: the CSV header cannot be read ({exc})") from None
        header = [name.strip() for name in header]
        if len(set(header)) != len(header):
            raise DataError(f"{self.label}: a column name appears twice in the header: {header}")
        self.header = header

    def parse(self, chunk: bytes, where: str, offset: int | None) -> Record | None:
        """The record in ``chunk``, ``None`` for a blank line."""
        try:
            text = chunk.decode(self.encoding)
        except UnicodeDecodeError:
            return Record({}, where, offset, error=f"not valid {self.encoding}")
        if not text.strip():
            return None
        if "\x00" in text:
            return Record({}, where, offset, error="contains a NUL character")
        if self.fmt == "jsonl":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                return Record({}, where, offset, error=f"not valid JSON ({exc.msg})", raw=text)
            if not isinstance(value, dict):
                return Record({}, where, offset, error="not a JSON object", raw=text)
            return Record(value, where, offset, raw=text)
        try:
            row = _parse_csv_record(text)
        except (ValueError, csv.Error) as exc:
            return Record({}, where, offset, error=f"not a CSV record ({exc})", raw=text)
        assert self.header is not None
        if len(row) != len(self.header):
            return Record(
                {}, where, offset, error=f"{len(row)} fields where the header has {len(self.header)}", raw=text
            )
        return Record(dict(zip(self.header, row, strict=True)), where, offset, raw=text)


class FileSource:
    """A CSV/JSONL file read from a byte offset; with ``follow`` it is watched for new lines."""

    def __init__(self, path: Path, fmt: str, encoding: str = "utf-8", *, follow: bool = False) -> None:
        self.path, self.fmt, self.encoding, self.follow = Path(path), fmt, encoding, follow
        self.name = str(self.path.absolute())
        if not follow and not self.path.is_file():
            raise DataError(f"{self.path}: file not found")

    def _read_header(self, handle: IO[bytes], parser: _Parser) -> int:
        """Read the CSV header (from the start, whatever the offset); the offset just after it, or -1 when the
        header is not complete yet."""
        handle.seek(0)
        chunk = b""
        while True:
            line = handle.readline()
            if not line.endswith(b"\n") and self.follow:
                return -1
            chunk += line
            if parser.complete(chunk) or not line:
                break
        if not chunk.strip():
            return -1 if self.follow else 0
        parser.set_header(chunk.removeprefix(_BOM))
        return handle.tell()

    def read(self, offset: int) -> Iterator[Record]:
        """Every complete record after ``offset``; at the end of a file that is not followed, the last line
        counts even without its newline."""
        if not self.path.is_file():
            return
        parser = _Parser(self.fmt, self.encoding, str(self.path))
        with self.path.open("rb") as handle:
            start = 0
            if self.fmt == "csv":
                start = self._read_header(handle, parser)
                if start < 0 or (start == 0 and not self.follow):
                    return
            position = max(offset, start)
            handle.seek(position)
            line_number = None if position > start else (2 if self.fmt == "csv" else 1)
            chunk, chunk_start, chunk_line = b"", position, line_number
            while True:
                line = handle.readline()
                if not line:
                    if chunk and not self.follow:
                        yield from self._emit(parser, chunk, chunk_start, chunk_line, position)
                    return
                if not line.endswith(b"\n") and self.follow:
                    return  # still being written: read again next time from the last complete record
                if not chunk:
                    chunk_start, chunk_line = position, line_number
                chunk += line
                position += len(line)
                if line_number is not None:
                    line_number += 1
                if parser.complete(chunk):
                    if chunk_start == 0:
                        chunk = chunk.removeprefix(_BOM)
                    yield from self._emit(parser, chunk, chunk_start, chunk_line, position)
                    chunk = b""

    def _emit(self, parser: _Parser, chunk: bytes, start: int, line: int | None, end: int) -> Iterator[Record]:
        where = f"{self.path.name}:{line}" if line is not None else f"{self.path.name}@byte {start}"
        record = parser.parse(chunk, where, end)
        if record is None:  # a blank line: nothing to store, but the offset moves past it
            record = Record({}, where, end, blank=True)
        yield record

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def records(
        self,
        offset: int,
        *,
        poll_interval: float = 1.0,
        stop: Callable[[], bool] = lambda: False,
        on_truncated: Callable[[int, int], None] | None = None,
    ) -> Iterator[Record | None]:
        """All records after ``offset``; when following, then the new ones as they come, with ``None`` after
        each look that found nothing, until ``stop()``. A followed file that shrank (rotated or truncated) is
        read again from the start: ids make the items already stored harmless."""
        last = offset
        while True:
            if self.follow and self.size() < last:
                if on_truncated is not None:
                    on_truncated(last, self.size())
                last = 0
            for record in self.read(last):
                if record.offset is not None:
                    last = record.offset
                yield record
            if not self.follow or stop():
                return
            yield None
            if stop():
                return
            time.sleep(poll_interval)


def stdin_records(
    stream: IO[bytes], fmt: str, encoding: str = "utf-8", idle_seconds: float = _STDIN_IDLE_SECONDS
) -> Iterator[Record | None]:
    """Records from a byte stream (stdin), with ``None`` whenever it stays quiet for ``idle_seconds``.

    A thread reads the lines, so that a quiet producer never keeps the runner from committing what it holds.
    """
    lines: queue.Queue[bytes | None] = queue.Queue(maxsize=10_000)

    def pump() -> None:
        try:
            for line in iter(stream.readline, b""):
                lines.put(line)
        finally:
            lines.put(None)

    threading.Thread(target=pump, name="monitor-stdin", daemon=True).start()
    parser = _Parser(fmt, encoding, "stdin")
    number, chunk, first = 0, b"", 0
    while True:
        try:
            line = lines.get(timeout=idle_seconds)
        except queue.Empty:
            yield None
            continue
        if line is None:
            if chunk:
                record = parser.parse(chunk, f"stdin:{first}", None)
                if record is not None:
                    yield record
            return
        number += 1
        if not chunk:
            first = number
        chunk += line
        if not parser.complete(chunk):
            continue
        if number == first == 1:
            chunk = chunk.removeprefix(_BOM)
        if fmt == "csv" and parser.header is None:
            if chunk.strip():
                parser.set_header(chunk)
            chunk = b""
            continue
        record = parser.parse(chunk, f"stdin:{first}", None)
        chunk = b""
        if record is not None:
            yield record
