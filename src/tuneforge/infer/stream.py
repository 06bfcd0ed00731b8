"""Classify a large file in constant memory: read a chunk, classify it, write it, repeat.

Inputs: ``.csv``, ``.tsv``, ``.jsonl``, ``.txt`` (one text per non-blank line) and ``.parquet`` (read
in row batches). Outputs: ``.csv``, ``.tsv`` or ``.jsonl`` with the source row, the text, the label,
its probability and, with ``top_k > 1``, the runners-up. The output is written to a temporary file
next to the target and renamed into place only when every row is done, so an interrupted run never
leaves a half-written predictions file (nor replaces an earlier one).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


class TextSource:
    """The texts of one file, read lazily as ``(row, text)`` pairs; rows are 1-based as in error messages.

    Opening checks what can be checked cheaply (the file exists, has the text column) so that a bad
    file fails before a model is loaded.
    """

    def __init__(self, path: Path, *, text_column: str = "text", encoding: str = "utf-8") -> None:
        self.path = Path(path)
        self.format = input_format(self.path)
        self.text_column = text_column
        self.encoding_name = encoding
        # utf-8-sig drops the BOM Excel writes and reads plain UTF-8 the same.
        self.encoding = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
        if not self.path.exists():
            raise DataError(f"{self.path}: file not found")
        if not self.path.is_file():
            raise DataError(f"{self.path}: not a file")
        if self.path.stat().st_size == 0:
            raise DataError(f"{self.path}: file is empty")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise DataError(f"{self.path}: unknown encoding '{encoding}'") from None
        self._binary: IO[bytes] | None = None
        self._last_row = 0
        if self.format == "parquet":
            self._check_parquet_column()
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

    def _open_text(self) -> io.TextIOWrapper:
        self._binary = self.path.open("rb")
        # newline="" lets the csv module see quoted embedded newlines and CRLF as they are.
        return io.TextIOWrapper(self._binary, encoding=self.encoding, errors="strict", newline="")

    def _iter_text_rows(self) -> Iterator[tuple[int, str]]:
        handle = self._open_text()
        try:
            if self.format in ("csv", "tsv"):
                yield from self._iter_delimited(handle)
            elif self.format == "jsonl":
                yield from self._iter_jsonl(handle)
            else:
                yield from self._iter_txt(handle)
        except UnicodeDecodeError as exc:
            # Text is decoded a buffer at a time, so the row is known only as "after the last good one".
            where = f"after row {self._last_row}" if self._last_row else "near the start"
            raise DataError(
                f"{self.path}: {where}: cannot decode bytes with encoding '{self.encoding_name}' "
                f"(byte 0x{exc.object[exc.start]:02x}); pass --encoding, e.g. latin-1"
            ) from None

    def _iter_delimited(self, handle: io.TextIOWrapper) -> Iterator[tuple[int, str]]:
        if self.format == "tsv":
            # QUOTE_NONE as in training: TSV corpora (SST-2) have bare quotes that belong to the text.
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{self.path}: file is empty")
            header = [name.strip() for name in header]
            if self.text_column not in header:
                raise DataError(
                    f"{self.path}: missing column '{self.text_column}' (columns: {', '.join(header)}); "
                    "pass --text-column"
                )
            index = header.index(self.text_column)
            row = 0
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip() and len(header) > 1):
                    continue  # blank line, as in the training reader
                row += 1
                if len(record) != len(header):
                    raise DataError(
                        f"{self.path}: row {row} (line {reader.line_num}): expected {len(header)} fields, "
                        f"found {len(record)}"
                    )
                self._last_row = row
                yield row, record[index]
        except csv.Error as exc:
            raise DataError(f"{self.path}: line {reader.line_num}: cannot parse {self.format.upper()}: {exc}") from None

    def _iter_jsonl(self, handle: io.TextIOWrapper) -> Iterator[tuple[int, str]]:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.path}: line {number}: not valid JSON ({exc.msg})") from None
            if isinstance(record, str):
                text = record  # a line that is just a JSON string is a text
            elif isinstance(record, dict):
                if self.text_column not in record:
                    keys = ", ".join(str(k) for k in record) or "none"
                    raise DataError(
                        f"{self.path}: line {number}: missing key '{self.text_column}' (keys: {keys}); "
                        "pass --text-column"
                    )
                text = record[self.text_column]
                if text is None:
                    text = ""
                elif not isinstance(text, str):
                    if isinstance(text, bool) or not isinstance(text, (int, float)):
                        raise DataError(f"{self.path}: line {number}: text must be a string, got {type(text).__name__}")
                    text = str(text)
            else:
                raise DataError(f"{self.path}: line {number}: expected a JSON object, got {type(record).__name__}")
            self._last_row = number
            yield number, text

    def _iter_txt(self, handle: io.TextIOWrapper) -> Iterator[tuple[int, str]]:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                self._last_row = number
                yield number, text

    def _check_parquet_column(self) -> None:
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(self.path).schema_arrow.names
        except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
            raise DataError(f"{self.path}: cannot read Parquet file: {str(exc).splitlines()[0]}") from None
        if self.text_column not in names:
            raise DataError(
                f"{self.path}: missing column '{self.text_column}' (columns: {', '.join(names)}); pass --text-column"
            )

    def _iter_parquet(self) -> Iterator[tuple[int, str]]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=DEFAULT_CHUNK_SIZE, columns=[self.text_column]):
            for value in batch.column(0).to_pylist():
                row += 1
                self._last_row = row
                yield row, "" if value is None else str(value)


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
