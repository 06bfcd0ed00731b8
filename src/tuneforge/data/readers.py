"""Read labelled texts from CSV, TSV, JSONL and Parquet files.

Every problem becomes a one-line ``DataError`` naming the file and, where known, the row or line, so
the CLI can print it without a traceback. Texts are returned exactly as read; cleaning is separate.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "parquet")
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class LabelledTexts:
    """Parallel lists of texts and labels, with where each came from for error messages."""

    texts: list[str]
    labels: list[str]
    rows: list[int]  # 1-based source row (data rows, header excluded; the line number for JSONL)
    source: str  # file path, for messages

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


def read_labelled_file(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    format: str = "auto",
    require_labels: bool = True,
) -> LabelledTexts:
    """Read one data file.

    With ``require_labels=False`` the label column may be missing or empty (labels are then ``""``),
    which is what prediction on unlabelled files needs.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise DataError(f"{source}: file not found")
    if not path.is_file():
        raise DataError(f"{source}: not a file")
    fmt = _resolve_format(path, format)
    if path.stat().st_size == 0:
        raise DataError(f"{source}: file is empty")

    if fmt == "parquet":
        texts, labels, rows = _read_parquet(path, source, text_column, label_column, require_labels)
    else:
        content = _decode(path.read_bytes(), source, encoding)
        if not content.strip():
            raise DataError(f"{source}: file is empty")
        if fmt == "jsonl":
            texts, labels, rows = _read_jsonl(content, source, text_column, label_column, require_labels)
        else:
            texts, labels, rows = _read_delimited(content, source, fmt, text_column, label_column, require_labels)
    if not texts:
        raise DataError(f"{source}: has no data rows")
    return LabelledTexts(texts=texts, labels=labels, rows=rows, source=source)


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


def _decode(raw: bytes, source: str, encoding: str) -> str:
    # Decode the whole file strictly up front: a wrong encoding must fail loudly with a line number,
    # not silently turn accented letters into mojibake or replacement characters.
    try:
        content = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start]
        raise DataError(
            f"{source}: line {line}: cannot decode bytes with encoding '{encoding}' (byte 0x{byte:02x}); "
            "set data.encoding, e.g. latin-1"
        ) from None
    except LookupError:
        raise DataError(f"{source}: unknown encoding '{encoding}'; set data.encoding") from None
    # Excel and Notepad write a UTF-8 BOM; left in place it would become part of the first column name.
    return content.removeprefix("\ufeff")


def _column_index(header: list[str], column: str, key: str, source: str) -> int:
    try:
        return header.index(column)
    except ValueError:
        listed = ", ".join(header) if header else "none"
        raise DataError(f"{source}: missing column '{column}' (columns: {listed}); set data.{key}") from None


def _read_delimited(
    content: str, source: str, fmt: str, text_column: str, label_column: str, require_labels: bool
) -> tuple[list[str], list[str], list[int]]:
    if fmt == "tsv":
        # QUOTE_NONE: TSV corpora such as SST-2 contain bare quote characters that are part of the text.
        reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        # newline="" lets the csv module see CRLF and quoted embedded newlines as they are.
        reader = csv.reader(io.StringIO(content, newline=""))
    texts: list[str] = []
    labels: list[str] = []
    rows: list[int] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{source}: file is empty")
        header = [name.strip() for name in header]
        text_idx = _column_index(header, text_column, "text_column", source)
        label_idx = (
            _column_index(header, label_column, "label_column", source)
            if require_labels or label_column in header
            else None
        )
        row_number = 0
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip() and len(header) > 1):
                continue  # blank lines carry no data; skipping them matches pandas
            row_number += 1
            if len(record) != len(header):
                hint = " (an unquoted delimiter in the text?)" if len(record) > len(header) else ""
                raise DataError(
                    f"{source}: row {row_number} (line {reader.line_num}): expected {len(header)} fields, "
                    f"found {len(record)}{hint}"
                )
            label = record[label_idx].strip() if label_idx is not None else ""
            if require_labels and not label:
                raise DataError(f"{source}: row {row_number}: empty label")
            texts.append(record[text_idx])
            labels.append(label)
            rows.append(row_number)
    except csv.Error as exc:
        raise DataError(f"{source}: line {reader.line_num}: cannot parse {fmt.upper()}: {exc}") from None
    return texts, labels, rows


def _label_to_str(value: Any) -> str:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar from parquet -> plain Python value
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        # pandas turns an int column with a missing value into floats; 1.0 should still be label "1".
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def _text_value(value: Any, where: str, source: str) -> str:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # a missing text is an empty text; cleaning drops and counts it
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    raise DataError(f"{source}: {where}: text must be a string, got {type(value).__name__}")


def _read_jsonl(
    content: str, source: str, text_column: str, label_column: str, require_labels: bool
) -> tuple[list[str], list[str], list[int]]:
    records: list[tuple[int, Any]] = []
    if content.lstrip().startswith("["):
        # A plain JSON array of objects (common for .json files) is accepted too.
        try:
            items = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        records = [(i + 1, item) for i, item in enumerate(items)]
        unit = "item"
    else:
        for line_number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: line {line_number}: not valid JSON ({exc.msg})") from None
        unit = "line"

    texts: list[str] = []
    labels: list[str] = []
    rows: list[int] = []
    for position, (number, record) in enumerate(records):
        where = f"{unit} {number}"
        if not isinstance(record, dict):
            raise DataError(f"{source}: {where}: expected a JSON object, got {type(record).__name__}")
        if position == 0:
            # The first object stands in for a header, so a wrong column name gets the same message
            # (with the available keys) as for CSV.
            keys = [str(key) for key in record]
            _column_index(keys, text_column, "text_column", source)
            if require_labels:
                _column_index(keys, label_column, "label_column", source)
        if text_column not in record:
            raise DataError(f"{source}: {where}: missing key '{text_column}'")
        if require_labels and label_column not in record:
            raise DataError(f"{source}: {where}: missing key '{label_column}'")
        label = _label_to_str(record.get(label_column))
        if require_labels and not label:
            raise DataError(f"{source}: {where}: empty label")
        texts.append(_text_value(record[text_column], where, source))
        labels.append(label)
        rows.append(number)
    return texts, labels, rows


def _read_parquet(
    path: Path, source: str, text_column: str, label_column: str, require_labels: bool
) -> tuple[list[str], list[str], list[int]]:
    import pandas as pd  # imported here: pandas is slow to import and only parquet needs it

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{source}: cannot read Parquet file: {detail}") from None
    columns = [str(name) for name in frame.columns]
    _column_index(columns, text_column, "text_column", source)
    has_labels = label_column in columns
    if require_labels:
        _column_index(columns, label_column, "label_column", source)
    texts: list[str] = []
    labels: list[str] = []
    rows: list[int] = []
    text_values = frame[text_column].tolist()
    label_values = frame[label_column].tolist() if has_labels else [None] * len(text_values)
    for index, (text, raw_label) in enumerate(zip(text_values, label_values, strict=True), start=1):
        label = _label_to_str(raw_label)
        if require_labels and not label:
            raise DataError(f"{source}: row {index}: empty label")
        texts.append(_text_value(text, f"row {index}", source))
        labels.append(label)
        rows.append(index)
    return texts, labels, rows
