"""Classify a large file in constant memory: read a chunk, classify it, write it, repeat.

Inputs: ``.csv``, ``.tsv``, ``.jsonl``, ``.txt`` (one text per non-blank line) and ``.parquet`` (read
in row batches). Outputs: ``.csv``, ``.tsv`` or ``.jsonl`` with the source row, the text, the label,
its probability and, with ``top_k > 1``, the runners-up. The output is written to a temporary file
next to the target and renamed into place only when every row is done, so an interrupted run never
leaves a half-written predictions file (nor replaces an earlier one).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneforge.data.readers import (
    Column,
    Hints,
    check_file,
    check_no_nul,
    decode_error,
    delimited_records,
    json_lines,
    open_text,
    parquet_columns,
    text_value,
)
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.files import atomic_write_with
from tuneforge.infer.predictor import Prediction

INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".txt": "txt", ".parquet": "parquet"}
OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
DEFAULT_CHUNK_SIZE = 1024


class TextPredictor(Protocol):
    def predict(self, texts: list[str], *, top_k: int = 1) -> list[Prediction]: ...


@dataclass(frozen=True)
class StreamResult:
    out: Path
    rows: int
    seconds: float

    @property
    def texts_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; use {', '.join(INPUT_FORMATS)}")
    return fmt


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TuneforgeError(f"--out: unsupported file type {path.suffix or '(none)'}; use {', '.join(OUTPUT_FORMATS)}")
    return fmt


_CLI_HINTS = Hints(text_column="pass --text-column", label_column="pass --label-column", encoding="pass --encoding")


class TextSource:
    """The texts of one file, read lazily as ``(row, text)`` pairs; rows are 1-based as in error messages.

    Opening checks what can be checked cheaply (the file exists, has the text column) so that a bad
    file fails before a model is loaded. Parsing is the training reader's (``tuneforge.data.readers``),
    with the same strictness; ``.txt`` has one text per line, where only ``\n`` ends a line.
    """

    def __init__(self, path: Path, *, text_column: str = "text", encoding: str = "utf-8") -> None:
        self.path = Path(path)
        self.format = input_format(self.path)
        self.text_column = text_column
        self.encoding = encoding
        self._column = Column(text_column, _CLI_HINTS.text_column)
        check_file(self.path)
        self._binary: IO[bytes] | None = None
        self._last_row = 0
        if self.format == "parquet":
            parquet_columns(self.path, [self._column])
        else:
            # Reads only the header and the first record, so that a wrong column fails here.
            peek = self._iter_text_rows()
            try:
                next(peek, None)
            finally:
                peek.close()
                self._close()
            self._last_row = 0

    @property
    def total(self) -> int:
        """Progress total: bytes for text formats, rows for Parquet."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(self.path).metadata.num_rows)
        return self.path.stat().st_size

    def position(self) -> int:
        """Progress so far, in the unit of :attr:`total` (bytes read ahead by the buffer count as read)."""
        if self.format == "parquet":
            return self._last_row
        return self._binary.tell() if self._binary is not None and not self._binary.closed else 0

    def __iter__(self) -> Iterator[tuple[int, str]]:
        self._last_row = 0
        try:
            if self.format == "parquet":
                yield from self._iter_parquet()
            else:
                yield from self._iter_text_rows()
        finally:
            self._close()

    def _close(self) -> None:
        if self._binary is not None:
            self._binary.close()
            self._binary = None

    def _iter_text_rows(self) -> Iterator[tuple[int, str]]:
        self._binary = self.path.open("rb")
        # newline="": the csv module sees quoted embedded newlines and CRLF as they are; one record a
        # line otherwise, split on \n only, so a U+2028 or U+0085 inside a text does not split it.
        newline = "" if self.format in ("csv", "tsv") else "\n"
        handle = open_text(self._binary, self.path, self.encoding, _CLI_HINTS, newline=newline)
        try:
            if self.format in ("csv", "tsv"):
                rows = delimited_records(handle, self.format, self.path, [self._column], _CLI_HINTS, Counter())
                for row, (text,) in rows:
                    self._last_row = row
                    yield row, text
            elif self.format == "jsonl":
                yield from self._iter_jsonl(handle)
            else:
                yield from self._iter_txt(handle)
        except UnicodeDecodeError:
            raise decode_error(self.path, self.encoding, _CLI_HINTS) from None

    def _iter_jsonl(self, handle: IO[str]) -> Iterator[tuple[int, str]]:
        counts: Counter[str] = Counter()
        for number, record in json_lines(handle, self.path, counts):
            where = f"line {number}"
            if isinstance(record, str):
                text = record  # a line that is just a JSON string is a text
            elif isinstance(record, dict):
                if self.text_column not in record:
                    keys = ", ".join(str(k) for k in record) or "none"
                    raise DataError(
                        f"{self.path}: {where}: missing key '{self.text_column}' (keys: {keys}); pass --text-column"
                    )
                text = text_value(record[self.text_column], where, self.path, counts)
            else:
                raise DataError(f"{self.path}: {where}: expected a JSON object, got {type(record).__name__}")
            self._last_row = number
            yield number, text

    def _iter_txt(self, handle: IO[str]) -> Iterator[tuple[int, str]]:
        for number, line in enumerate(handle, start=1):
            text = line.removesuffix("\n").removesuffix("\r")
            if text.strip():
                check_no_nul(text, self.path, f"line {number}", _CLI_HINTS)
                self._last_row = number
                yield number, text

    def _iter_parquet(self) -> Iterator[tuple[int, str]]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=DEFAULT_CHUNK_SIZE, columns=[self.text_column]):
            for value in batch.column(0).to_pylist():
                row += 1
                self._last_row = row
                yield row, "" if value is None else str(value)


def read_texts(path: Path, *, text_column: str = "text", encoding: str = "utf-8") -> list[str]:
    """Every text of a file, in order: one per data row, or one per non-blank line of a ``.txt`` file."""
    return [text for _, text in TextSource(path, text_column=text_column, encoding=encoding)]


def _tsv_field(value: str) -> str:
    # Tabs and line breaks would split the record; TSV has no quoting to protect them.
    return value.replace("\t", " ").replace("\r", " ").replace("\n", " ")


class PredictionWriter:
    """Writes predictions as CSV, TSV or JSONL to an open text handle."""

    def __init__(self, handle: IO[str], fmt: str, top_k: int) -> None:
        self.handle = handle
        self.format = fmt
        self.top_k = top_k
        header = ["row", "text", "label", "probability"]
        for rank in range(2, top_k + 1):
            header += [f"label_{rank}", f"probability_{rank}"]
        self._csv = csv.writer(handle, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(header)
        elif fmt == "tsv":
            handle.write("\t".join(header) + "\n")

    def write(self, rows: Sequence[tuple[int, str]], predictions: Sequence[Prediction]) -> None:
        for (row, text), prediction in zip(rows, predictions, strict=True):
            if self.format == "jsonl":
                record = {"row": row, "text": text, **prediction.to_dict()}
                self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            fields = [str(row), text, prediction.label, f"{prediction.probability:.6f}"]
            for label, probability in prediction.top_k[1 : self.top_k]:
                fields += [label, f"{probability:.6f}"]
            if self._csv is not None:
                self._csv.writerow(fields)
            else:
                self.handle.write("\t".join(_tsv_field(f) for f in fields) + "\n")


def _chunks(source: TextSource, size: int) -> Iterator[list[tuple[int, str]]]:
    iterator = iter(source)
    while chunk := list(islice(iterator, size)):
        yield chunk


def stream_predictions(
    predictor: TextPredictor,
    source: TextSource,
    out: Path,
    *,
    top_k: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    show_progress: bool = True,
    console: Console | None = None,
) -> StreamResult:
    """Classify every text of ``source`` chunk by chunk and write ``out`` atomically."""
    if chunk_size < 1:
        raise TuneforgeError(f"--chunk-size: must be at least 1, got {chunk_size}")
    if top_k < 1:
        raise TuneforgeError(f"--top-k: must be at least 1, got {top_k}")
    fmt = output_format(out)
    if out.resolve() == source.path.resolve():
        raise TuneforgeError(f"--out: {out} is the input file; choose another name")
    start = time.perf_counter()
    count = 0
    progress = Progress(
        TextColumn("[bold]classifying[/bold]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]:,} texts"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not show_progress,
        transient=False,
    )

    def write(tmp: Path) -> None:
        nonlocal count
        with tmp.open("w", encoding="utf-8", newline="") as handle, progress:
            task = progress.add_task("classify", total=source.total, rows=0)
            writer = PredictionWriter(handle, fmt, top_k)
            for chunk in _chunks(source, chunk_size):
                predictions = predictor.predict([text for _, text in chunk], top_k=top_k)
                writer.write(chunk, predictions)
                count += len(chunk)
                progress.update(task, completed=source.position(), rows=count)
            if count == 0:
                raise DataError(f"{source.path}: has no texts")
            progress.update(task, completed=source.total, rows=count)

    atomic_write_with(out, write)
    return StreamResult(out=out, rows=count, seconds=time.perf_counter() - start)
