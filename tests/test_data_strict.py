"""Readers: bounded memory, lines split on \\n only, and no silent guesses (issue 13, items 11-13)."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tuneforge.config import DataConfig
from tuneforge.data import format_audit, prepare_data, read_labelled_file
from tuneforge.errors import DataError

_BIG = 2000  # characters of an unused column per row


def _wide_csv(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("text,label,notes\n")
        for i in range(rows):
            handle.write(f"short text {i},{'ab'[i % 2]},{'n' * _BIG}\n")
    return path


def _wide_jsonl(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"text": f"short text {i}", "label": "ab"[i % 2], "notes": "n" * _BIG}) + "\n")
    return path


@pytest.mark.parametrize("make", [_wide_csv, _wide_jsonl], ids=["csv", "jsonl"])
def test_reading_holds_the_rows_not_the_file(tmp_path: Path, make) -> None:
    # 4,000 rows of ~2 KB: an 8 MB file whose kept texts and labels take well under 1 MB. Holding the
    # file's bytes or its decoded text even once would exceed the bound.
    path = make(tmp_path / f"wide.{make.__name__.rsplit('_', 1)[1]}", 4000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        data = read_labelled_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == 4000 and data.texts[-1] == "short text 3999"
    assert peak < size / 4, (peak, size)


def test_parquet_reads_only_the_needed_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "wide.parquet"
    rows = 2000
    notes = [f"{i:08d}" + "n" * 20_000 for i in range(rows)]  # ~40 MB that must never be read
    table = pa.table({"text": [f"t{i}" for i in range(rows)], "label": ["ab"[i % 2] for i in range(rows)]})
    pq.write_table(table.append_column("notes", pa.array(notes)), path, compression="none")
    del notes, table
    # Arrow allocates outside Python's tracked heap; its pool's peak is only clean in a fresh process.
    script = (
        "import sys, pyarrow as pa\n"
        "from tuneforge.data import read_labelled_file\n"
        "data = read_labelled_file(sys.argv[1])\n"
        "print(len(data), pa.default_memory_pool().max_memory())\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    count, peak = map(int, out.stdout.split())
    assert count == rows
    assert peak < 10_000_000, peak


def test_jsonl_lines_split_on_newline_only(tmp_path: Path) -> None:
    # Raw U+2028, U+0085, form feed and group separator are legal inside JSON strings; splitlines() splits at all.
    texts = ["one\u2028two", "three\x85four", "five\x0csix", "seven\x1deight"]
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": text, "label": "x"}, ensure_ascii=False) for text in texts]
    path.write_text("\n".join(lines) + "\r\n", encoding="utf-8")
    data = read_labelled_file(path)
    assert data.texts == texts
    assert data.rows == [1, 2, 3, 4]


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        (
            "dup.csv",
            "text,label,text\na,x,b\n",
            {},
            r"dup\.csv: column 'text' appears 2 times in the header \(columns 1 and 3\)",
        ),
        ("dup2.csv", "text,label ,label\na,x,y\n", {}, r"column 'label' appears 2 times"),
        (
            "swallow.csv",
            'text,label\nfine,a\n"unclosed start,b\nnormal,a\n"quoted",b\n',
            {},
            r"swallow\.csv: line 3: cannot parse CSV: .*a quote inside a quoted field must be doubled",
        ),
        ("open.csv", 'text,label\nfine,a\n"never closed,b\nmore,a\n', {}, r"open\.csv: line 3: .*never closed"),
        ("semi.csv", "text;label\na;x\n", {}, r"missing column 'text' .*the header looks semicolon-separated"),
        ("tabs.csv", "text\tlabel\na\tx\n", {}, r"the header looks tab-separated"),
        ("bom.csv", b"\xef\xbb\xbftext,label\na,x\n", {"encoding": "latin-1"}, r"UTF-8 byte-order mark .*'latin-1'"),
        ("u16.csv", "text,label\na,x\n".encode("utf-16"), {}, r"u16\.csv: starts with a UTF-16 byte-order mark"),
        (
            "joined.csv",
            "\ufefftext,label\na,x\n\ufefftext,label\nb,y\n",
            {},
            r"row 2 \(line 3\): starts with a byte-order mark",
        ),
        ("nul.csv", "text,label\nfine,x\nab\0cd,y\n", {}, r"nul\.csv: row 2 \(line 3\): contains a NUL byte"),
        ("nul.tsv", "text\tlabel\nab\0cd\ty\n", {}, r"contains a NUL byte"),
        (
            "dupkey.jsonl",
            '{"text": "a", "label": "x", "text": "b"}\n',
            {},
            r"line 1: key 'text' appears more than once",
        ),
        ("u16.jsonl", '{"text": "a", "label": "x"}\n'.encode("utf-16"), {}, r"UTF-16 byte-order mark"),
    ],
)
def test_ambiguous_input_is_an_error(
    tmp_path: Path, name: str, content: str | bytes, options: dict, message: str
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as info:
        read_labelled_file(path, **options)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_what_reading_skips_or_changes_is_counted(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "d.csv", "\ntext,label\nfirst,a\n\n ,\nsecond, b\nthird,b \n,,\n")
    data = read_labelled_file(csv_path)
    assert data.texts == ["first", "second", "third"] and data.labels == ["a", "b", "b"]
    assert data.read_counts == {"blank_lines": 4, "labels_stripped": 2}
    lines = [{"text": "one", "label": 1.0}, {"text": 2, "label": 0}, {"text": "three", "label": " 1"}]
    jsonl_path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    data = read_labelled_file(jsonl_path)
    assert data.texts == ["one", "2", "three"] and data.labels == ["1", "0", "1"]
    assert data.read_counts == {
        "labels_from_numbers": 2,
        "texts_from_numbers": 1,
        "labels_stripped": 1,
        "blank_lines": 1,
    }


def test_a_utf16_file_reads_with_its_encoding(tmp_path: Path) -> None:
    path = _write(tmp_path / "u16.csv", "text,label\ncaf\u00e9,x\n".encode("utf-16"))
    assert read_labelled_file(path, encoding="utf-16").texts == ["caf\u00e9"]


def test_audit_reports_reading_counts(tmp_path: Path) -> None:
    rows = [f"good thing {i},pos" for i in range(20)] + [f"bad thing {i}, neg " for i in range(20)]
    train = _write(
        tmp_path / "train.csv", "text,label\n" + "\n\n".join(rows[:3]) + "\n" + "\n".join(rows[3:]) + "\n  ,pos\n"
    )
    prepared = prepare_data(DataConfig(train=train, validation_size=0.2), seed=0)
    reading = prepared.audit["reading"]["train"]
    assert reading["blank_lines"] == 2
    assert reading["labels_stripped"] == 20
    assert reading["empty_texts"] == 1 and prepared.dropped["train_empty"] == 1
    json.dumps(prepared.audit)
    summary = format_audit(prepared.audit)
    assert "read train: blank lines skipped 2" in summary
    assert "labels with spaces stripped 20" in summary and "empty texts dropped 1" in summary


def test_a_file_read_as_training_reads_it_is_cleaned_and_never_all_empty(tmp_path: Path) -> None:
    from tuneforge.data.prepare import read_clean_file

    path = _write(tmp_path / "d.csv", b"text,label\n  Good   Film ,pos\n  ,neg\n")
    data = read_clean_file(path, DataConfig(train=path, lowercase=True))
    assert data.texts == ["good film"] and data.read_counts["empty_texts"] == 1
    empty = _write(tmp_path / "e.csv", b"text,label\n  ,pos\n\t,neg\n")
    with pytest.raises(DataError, match=r"e\.csv: all 2 texts are empty after cleaning"):
        read_clean_file(empty, DataConfig(train=empty))
