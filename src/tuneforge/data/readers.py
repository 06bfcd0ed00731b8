"""Read labelled texts from CSV, TSV, JSONL and Parquet files.

Files are streamed: CSV, TSV and JSONL a line at a time through one decoding text handle, Parquet a
batch of the needed columns at a time, so memory holds the rows kept and not the file besides. (A
``.json`` file holding one JSON array is the exception: JSON has no streaming form in the standard
library, so it is read whole.)

Every problem becomes a one-line ``DataError`` naming the file and, where known, the row or line, so
the CLI can print it without a traceback. Input that could be read in more than one way (a duplicate
column, an unclosed quote, a stray byte-order mark or NUL byte) is such an error, not a guess.
Whatever the reader skips or changes is counted in :attr:`LabelledTexts.read_counts`, so the audit
can report it. The helpers ``open_text``, ``delimited_records`` and ``json_lines`` are shared with the
streaming predictor, which reads the same formats.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from tuneforge.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "parquet")
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_PARQUET_BATCH = 8192
# JSON's own whitespace; str.strip() would also strip U+2028, U+0085 and others that JSON does not allow.
_JSON_SPACE = " \t\r\n"
_SEPARATORS = ((",", "comma"), ("\t", "tab"), (";", "semicolon"), ("|", "pipe"))


@dataclass(frozen=True)
class Hints:
    """How to tell the user to fix a setting: config keys for training, CLI options for ``predict``."""

    text_column: str = "set data.text_column"
    label_column: str = "set data.label_column"
    encoding: str = "set data.encoding"


CONFIG_HINTS = Hints()


@dataclass
class LabelledTexts:
    """Parallel lists of texts and labels, with where each came from for error messages."""

    texts: list[str]
    labels: list[str]
    rows: list[int]  # 1-based source row (data rows, header excluded; the line number for JSONL)
    source: str  # file path, for messages
    # What reading the file skipped or changed (blank_lines, labels_stripped, ...): describes the file
    # as read, so subsets do not carry it.
    read_counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> LabelledTexts:
        idx = list(indices)
        return LabelledTexts(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            rows=[self.rows[i] for i in idx],
            source=self.source,
        )


class Column(NamedTuple):
    name: str
    hint: str  # e.g. "set data.text_column"
    required: bool = True


def read_labelled_file(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    format: str = "auto",
    require_labels: bool = True,
    clean: Callable[[str], str] | None = None,
) -> LabelledTexts:
    """Read one data file.

    With ``require_labels=False`` the label column may be missing or empty (labels are then ``""``),
    which is what prediction on unlabelled files needs. With ``clean``, each text is cleaned as it is
    read and rows whose text is then empty are dropped (counted as ``empty_texts``), so the raw texts
    are never all held at once.
    """
    path = Path(path)
    counts: Counter[str] = Counter()
    texts: list[str] = []
    labels: list[str] = []
    rows: list[int] = []
    rows_read = 0
    for row, text, label in iter_labelled_rows(
        path,
        text_column=text_column,
        label_column=label_column,
        encoding=encoding,
        format=format,
        require_labels=require_labels,
        counts=counts,
    ):
        rows_read += 1
        if clean is not None:
            cleaned = clean(text)
            if not cleaned:
                counts["empty_texts"] += 1
                continue
            if cleaned != text:
                counts["texts_cleaned"] += 1
            text = cleaned
        texts.append(text)
        labels.append(label)
        rows.append(row)
    if not rows_read:
        raise DataError(f"{path}: has no data rows")
    return LabelledTexts(texts=texts, labels=labels, rows=rows, source=str(path), read_counts=dict(counts))


def iter_labelled_rows(
    path: Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    format: str = "auto",
    require_labels: bool = True,
    counts: Counter[str] | None = None,
) -> Iterator[tuple[int, str, str]]:
    """Yield ``(row, text, label)`` one row at a time; ``counts`` collects what was skipped or changed."""
    counts = Counter() if counts is None else counts
    check_file(path)
    fmt = _resolve_format(path, format)
    text = Column(text_column, CONFIG_HINTS.text_column)
    label = Column(label_column, CONFIG_HINTS.label_column, required=require_labels)
    # One str object per distinct label instead of one per row: millions of rows share a few labels.
    shared: dict[str, str] = {}
    if fmt == "parquet":
        rows = _parquet_rows(path, text, label, counts)
    elif fmt == "jsonl":
        rows = _jsonl_rows(path, encoding, text, label, counts)
    else:
        rows = _delimited_rows(path, fmt, encoding, text, label, counts)
    for row, text_value, label_value in rows:
        if require_labels and not label_value:
            raise DataError(f"{path}: {_row_word(fmt)} {row}: empty label")
        yield row, text_value, shared.setdefault(label_value, label_value)


def check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _row_word(fmt: str) -> str:
    return "line" if fmt == "jsonl" else "row"


def _resolve_format(path: Path, format: str) -> str:
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"{path}: unknown format {format!r}; use one of auto, {', '.join(FORMATS)}")
        return format
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        suffix = path.suffix or "(none)"
        raise DataError(
            f"{path}: unsupported file type {suffix}; use .csv, .tsv, .jsonl, .json or .parquet, or set data.format"
        )
    return fmt


# --- decoding ------------------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32", ("utf-32",)),
    (codecs.BOM_UTF32_BE, "UTF-32", ("utf-32",)),
    (codecs.BOM_UTF8, "UTF-8", ("utf-8", "utf-8-sig")),
    (codecs.BOM_UTF16_LE, "UTF-16", ("utf-16",)),
    (codecs.BOM_UTF16_BE, "UTF-16", ("utf-16",)),
)


def open_text(binary: IO[bytes], path: Path, encoding: str, hints: Hints, *, newline: str) -> io.TextIOWrapper:
    """A strict decoding text handle over ``binary``, after checking a byte-order mark against ``encoding``.

    A UTF-8 BOM (Excel, Notepad) is dropped when reading UTF-8. Any other mismatch is an error: read
    with the wrong encoding, a BOM turns into letters in the first column name, or every byte into
    mojibake. Use ``newline=""`` for CSV (the csv module sees line endings as they are) and
    ``newline="\\n"`` for one record a line (only ``\\n`` ends a line, never U+2028 or U+0085).
    """
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"{path}: unknown encoding '{encoding}'; {hints.encoding}") from None
    start = binary.read(4)
    binary.seek(0)
    for bom, family, accepted in _BOMS:
        if start.startswith(bom):
            if name not in accepted:
                raise DataError(
                    f"{path}: starts with a {family} byte-order mark but the encoding is '{encoding}'; "
                    f"{hints.encoding} to {family.lower()}"
                )
            break
    if name == "utf-8":
        name = "utf-8-sig"  # reads plain UTF-8 the same and drops the BOM
    return io.TextIOWrapper(binary, encoding=name, errors="strict", newline=newline)


def decode_error(path: Path, encoding: str, hints: Hints) -> DataError:
    """The error for a file that does not decode, naming the line of the first bad byte.

    The text handle decodes a buffer at a time and cannot say where it failed, so this reads the
    file again (it is failing anyway) with an incremental decoder that counts lines as it goes.
    """
    name = codecs.lookup(encoding).name
    decoder = codecs.getincrementaldecoder("utf-8-sig" if name == "utf-8" else name)(errors="strict")
    line = 1
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                line += decoder.decode(chunk).count("\n")
            except UnicodeDecodeError as exc:
                good = exc.object[: exc.start].decode(name, errors="replace")
                line += good.count("\n")
                byte = f" (byte 0x{exc.object[exc.start]:02x})"
                break
        else:
            byte = ""  # only the end of the file was cut off in the middle of a character
    return DataError(
        f"{path}: line {line}: cannot decode bytes with encoding '{encoding}'{byte}; {hints.encoding}, e.g. latin-1"
    )


def check_no_nul(value: str, path: Path, where: str, hints: Hints) -> None:
    # A NUL never belongs in a text; it means a binary file or a UTF-16 file read as 8-bit text.
    if "\0" in value:
        raise DataError(f"{path}: {where}: contains a NUL byte (a UTF-16 or binary file?); {hints.encoding}")


# --- CSV and TSV ---------------------------------------------------------------------------------


def column_index(header: list[str], column: Column, path: Path) -> int | None:
    """Where ``column`` is in ``header``; None for an optional column that is absent."""
    positions = [i for i, name in enumerate(header) if name == column.name]
    if len(positions) > 1:
        where = " and ".join(str(i + 1) for i in positions)
        raise DataError(
            f"{path}: column '{column.name}' appears {len(positions)} times in the header (columns {where})"
        )
    if positions:
        return positions[0]
    if not column.required:
        return None
    listed = ", ".join(header) if header else "none"
    raise DataError(
        f"{path}: missing column '{column.name}' (columns: {listed}){_separator_hint(header, column.name)}; "
        f"{column.hint}"
    )


def _separator_hint(header: list[str], column: str) -> str:
    if len(header) != 1:
        return ""
    for separator, name in _SEPARATORS:
        if column in (part.strip() for part in header[0].split(separator)):
            return f"; the header looks {name}-separated: check the file type (.csv is comma-, .tsv tab-separated)"
    return ""


def delimited_records(
    handle: IO[str], fmt: str, path: Path, columns: list[Column], hints: Hints, counts: Counter[str]
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(row, values of columns)`` for each data row; absent optional columns give ``""``.

    CSV is parsed strictly: a quote that is opened and never closed, or a bare quote inside a quoted
    field, is an error. Read leniently, the first swallows every following line into one text and
    the second silently drops a quote character.
    """
    if fmt == "tsv":
        # QUOTE_NONE: TSV corpora such as SST-2 contain bare quote characters that are part of the text.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    else:
        reader = csv.reader(handle, strict=True)
    records = iter(reader)
    start = 1
    try:
        first = next(records, None)
        while first is not None and not any(value.strip() for value in first):
            counts["blank_lines"] += 1  # blank lines before the header
            first = next(records, None)
        if first is None:
            raise DataError(f"{path}: file is empty")
        check_no_nul("".join(first), path, "header", hints)
        header = [name.strip() for name in first]
        indices = [column_index(header, column, path) for column in columns]
        row = 0
        start = reader.line_num + 1
        for record in records:
            if not any(value.strip() for value in record):
                counts["blank_lines"] += reader.line_num - start + 1
                start = reader.line_num + 1
                continue
            row += 1
            lines = f"line {start}" if reader.line_num == start else f"lines {start}-{reader.line_num}"
            where = f"row {row} ({lines})"
            if len(record) != len(header):
                hint = " (an unquoted delimiter in the text?)" if len(record) > len(header) else ""
                raise DataError(f"{path}: {where}: expected {len(header)} fields, found {len(record)}{hint}")
            if record[0].startswith("\ufeff"):
                raise DataError(f"{path}: {where}: starts with a byte-order mark (were files joined together?)")
            values = [record[i] if i is not None else "" for i in indices]
            for value in values:
                check_no_nul(value, path, where, hints)
            yield row, values
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}: line {start}: cannot parse {fmt.upper()}: {_csv_problem(exc)}") from None


def _csv_problem(exc: csv.Error) -> str:
    message = str(exc)
    if message == "unexpected end of data":
        return "a quoted field starting here is never closed (unbalanced quote)"
    if "expected after" in message:
        return f'{message} (a quote inside a quoted field must be doubled: "")'
    return message


def _delimited_rows(
    path: Path, fmt: str, encoding: str, text: Column, label: Column, counts: Counter[str]
) -> Iterator[tuple[int, str, str]]:
    with path.open("rb") as binary, open_text(binary, path, encoding, CONFIG_HINTS, newline="") as handle:
        try:
            for row, (text_value, label_value) in delimited_records(
                handle, fmt, path, [text, label], CONFIG_HINTS, counts
            ):
                stripped = label_value.strip()
                if stripped != label_value:
                    counts["labels_stripped"] += 1
                yield row, text_value, stripped
        except UnicodeDecodeError:
            raise decode_error(path, encoding, CONFIG_HINTS) from None


# --- JSONL ---------------------------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        repeated = sorted(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
        raise _DuplicateKeyError(repeated)
    return record


class _DuplicateKeyError(ValueError):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.keys = keys


def parse_json(text: str, path: Path, where: str) -> Any:
    """``json.loads`` that refuses an object with a repeated key (JSON leaves which value wins open)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {where}: not valid JSON ({exc.msg})") from None
    except _DuplicateKeyError as exc:
        keys = ", ".join(f"'{key}'" for key in exc.keys)
        raise DataError(f"{path}: {where}: key {keys} appears more than once in one object") from None


def json_lines(handle: IO[str], path: Path, counts: Counter[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed value)`` for each non-blank line; the handle must split on ``\\n`` only."""
    for number, line in enumerate(handle, start=1):
        if not line.strip(_JSON_SPACE):
            counts["blank_lines"] += 1
            continue
        yield number, parse_json(line, path, f"line {number}")


def _jsonl_rows(
    path: Path, encoding: str, text: Column, label: Column, counts: Counter[str]
) -> Iterator[tuple[int, str, str]]:
    with path.open("rb") as binary, open_text(binary, path, encoding, CONFIG_HINTS, newline="\n") as handle:
        try:
            first = handle.readline()
            while first and not first.strip(_JSON_SPACE):
                first = handle.readline()
            if not first:
                raise DataError(f"{path}: file is empty")
            if first.lstrip(_JSON_SPACE).startswith("["):
                # A plain JSON array of objects (common for .json files) is accepted too, read whole.
                items = parse_json(first + handle.read(), path, "the JSON array")
                records: Iterable[tuple[int, Any]] = enumerate(items, start=1)
                unit = "item"
            else:
                handle.seek(0)
                records = json_lines(handle, path, counts)
                unit = "line"
            yield from _json_records(records, unit, path, text, label, counts)
        except UnicodeDecodeError:
            raise decode_error(path, encoding, CONFIG_HINTS) from None


def _json_records(
    records: Iterable[tuple[int, Any]], unit: str, path: Path, text: Column, label: Column, counts: Counter[str]
) -> Iterator[tuple[int, str, str]]:
    first = True
    for number, record in records:
        where = f"{unit} {number}"
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
        if first:
            # The first object stands in for a header, so a wrong column name gets the same message
            # (with the available keys) as for CSV.
            keys = [str(key) for key in record]
            column_index(keys, text, path)
            column_index(keys, label, path)
            first = False
        if text.name not in record:
            raise DataError(f"{path}: {where}: missing key '{text.name}'")
        if label.required and label.name not in record:
            raise DataError(f"{path}: {where}: missing key '{label.name}'")
        yield number, text_value(record[text.name], where, path, counts), label_to_str(record.get(label.name), counts)


# --- values from JSON and Parquet ----------------------------------------------------------------


def label_to_str(value: Any, counts: Counter[str]) -> str:
    """A label as text; numbers (pandas writes 1.0 for an int column with a gap) and stripping are counted."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped != value:
            counts["labels_stripped"] += 1
        return stripped
    counts["labels_from_numbers"] += 1
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def text_value(value: Any, where: str, path: Path, counts: Counter[str]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # a missing text is an empty text; cleaning drops and counts it
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        counts["texts_from_numbers"] += 1
        return str(value)
    raise DataError(f"{path}: {where}: text must be a string, got {type(value).__name__}")


# --- Parquet -------------------------------------------------------------------------------------


def parquet_columns(path: Path, columns: list[Column]) -> list[str]:
    """The names of ``columns`` present in the file (checked like a CSV header), without reading data."""
    import pyarrow.parquet as pq  # imported here: only Parquet needs it

    try:
        names = [str(name) for name in pq.ParquetFile(path).schema_arrow.names]
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read Parquet file: {detail}") from None
    return [column.name for column in columns if column_index(names, column, path) is not None]


def _parquet_rows(path: Path, text: Column, label: Column, counts: Counter[str]) -> Iterator[tuple[int, str, str]]:
    import pyarrow.parquet as pq

    present = parquet_columns(path, [text, label])
    has_label = label.name in present
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH, columns=present):
            texts = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if has_label else [None] * len(texts)
            for text_raw, label_raw in zip(texts, labels, strict=True):
                row += 1
                yield row, text_value(text_raw, f"row {row}", path, counts), label_to_str(label_raw, counts)
    except DataError:
        raise
    except Exception as exc:  # a damaged row group surfaces only when it is read
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read Parquet file: {detail}") from None
