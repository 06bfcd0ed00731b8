"""Reading and cleaning labelled files: formats, encodings and one-line error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuneforge.data import LabelledTexts, clean_text, clean_texts, normalise_for_matching, read_labelled_file
from tuneforge.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TUNEFORGE_DATA_DIR", REPO.parent / "shared" / "data"))


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_csv_with_crlf_quoted_newline_and_bom(tmp_path: Path) -> None:
    content = (
        "\ufefftext,label\r\n"
        "The kettle whistles loudly,pos\r\n"
        '"Two lines\r\nin one, cell",neg\r\n'
        '"She said ""hello"" twice", pos \r\n'
    )
    path = write_bytes(tmp_path / "notes.csv", content.encode("utf-8"))
    data = read_labelled_file(path)
    assert data.texts == ["The kettle whistles loudly", "Two lines\r\nin one, cell", 'She said "hello" twice']
    assert data.labels == ["pos", "neg", "pos"]  # labels are stripped
    assert data.rows == [1, 2, 3]
    assert data.source == str(path)
    assert len(data) == 3


def test_tsv_with_bare_quotes(tmp_path: Path) -> None:
    content = 'sentence\tlabel\nit \'s a "lovely" mess \t1\n" half a quote \t0\n'
    path = write_bytes(tmp_path / "reviews.tsv", content.encode())
    data = read_labelled_file(path, text_column="sentence")
    assert data.texts == ['it \'s a "lovely" mess ', '" half a quote ']
    assert data.labels == ["1", "0"]
    cleaned, dropped = clean_texts(data)
    assert cleaned.texts[0] == 'it \'s a "lovely" mess'
    assert dropped == 0


def test_jsonl_skips_blank_lines_and_stringifies_int_labels(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "Green tea at noon", "label": 1}),
        "",
        json.dumps({"text": "Rain again", "label": 0}),
    ]
    path = write_bytes(tmp_path / "d.jsonl", ("\n".join(lines) + "\n").encode())
    data = read_labelled_file(path)
    assert data.texts == ["Green tea at noon", "Rain again"]
    assert data.labels == ["1", "0"]
    assert data.rows == [1, 3]  # JSONL rows are line numbers


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "data.jsonl", b'{"text": "a", "label": "x"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"data\.jsonl: line 3: not valid JSON"):
        read_labelled_file(path)
    path = write_bytes(tmp_path / "keys.jsonl", b'{"body": "a", "label": "x"}\n')
    with pytest.raises(DataError, match=r"missing column 'text' \(columns: body, label\)"):
        read_labelled_file(path)


def test_parquet(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["A quiet morning", "Loud trucks"], "label": [3, 7]}).to_parquet(path)
    data = read_labelled_file(path)
    assert data.texts == ["A quiet morning", "Loud trucks"]
    assert data.labels == ["3", "7"]
    assert data.rows == [1, 2]


def test_latin1_file_and_decode_error(tmp_path: Path) -> None:
    content = "text,label\nplain words,a\nmore words,b\ncaf\u00e9 au lait,a\n"
    path = write_bytes(tmp_path / "menu.csv", content.encode("latin-1"))
    data = read_labelled_file(path, encoding="latin-1")
    assert data.texts[2] == "caf\u00e9 au lait"
    with pytest.raises(DataError) as info:
        read_labelled_file(path)
    message = str(info.value)
    assert "menu.csv: line 4:" in message
    assert "encoding" in message and "0xe9" in message and "latin-1" in message
    assert "\n" not in message


def test_missing_column_lists_columns(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "reviews.csv", b"text,sentiment\nnice,pos\n")
    with pytest.raises(DataError) as info:
        read_labelled_file(path)
    assert str(info.value) == (f"{path}: missing column 'label' (columns: text, sentiment); set data.label_column")


def test_labels_optional_for_prediction(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "unlabelled.csv", b"text\nfirst\nsecond\n")
    data = read_labelled_file(path, require_labels=False)
    assert data.labels == ["", ""]


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.csv", b"", r"empty\.csv: file is empty"),
        ("blank.csv", b"\xef\xbb\xbf \n", r"blank\.csv: file is empty"),
        ("header.csv", b"text,label\r\n", r"header\.csv: has no data rows"),
        ("x.csv", b"text,label\na,b\nc,d\ne,f\ng,\n", r"x\.csv: row 4: empty label"),
        (
            "wide.csv",
            b"text,label\nwith, comma,b\n",
            r"wide\.csv: row 1 \(line 2\): expected 2 fields, found 3",
        ),
        ("notes.txt", b"text,label\n", r"unsupported file type \.txt"),
    ],
)
def test_file_errors(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = write_bytes(tmp_path / name, content)
    with pytest.raises(DataError, match=pattern):
        read_labelled_file(path)


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.csv: file not found"):
        read_labelled_file(tmp_path / "gone.csv")


def test_clean_text() -> None:
    assert clean_text("\uff21\uff22\uff23 \uff11\uff12") == "ABC 12"  # full-width -> ASCII via NFKC
    assert clean_text("Salt &amp; pepper") == "Salt & pepper"
    assert clean_text("  line one\r\n\n line\u00a0two\t ") == "line one line two"
    assert clean_text("Mixed CASE", lowercase=True) == "mixed case"
    assert normalise_for_matching("  Stra\u00dfe\n  NORTH ") == normalise_for_matching("strasse north")


def test_clean_texts_drops_and_counts_empties() -> None:
    data = LabelledTexts(
        texts=["ok", "  \n", "&nbsp;", "fine"], labels=["a", "b", "a", "b"], rows=[1, 2, 3, 4], source="s"
    )
    cleaned, dropped = clean_texts(data)
    assert dropped == 2
    assert cleaned.texts == ["ok", "fine"]
    assert cleaned.rows == [1, 4]
    assert cleaned.labels == ["a", "b"]


def test_real_banking77_and_sst2() -> None:
    banking = DATA_DIR / "banking77" / "test.csv"
    sst2 = DATA_DIR / "sst2" / "dev.tsv"
    if not banking.exists() or not sst2.exists():
        pytest.skip(f"real data not found under {DATA_DIR}")
    data = read_labelled_file(banking, label_column="category")
    assert len(data) == 3080
    assert len(set(data.labels)) == 77
    dev = read_labelled_file(sst2, text_column="sentence")
    assert len(dev) == 872
    assert set(dev.labels) == {"0", "1"}
    assert all(text.endswith(" ") for text in dev.texts)
    cleaned, dropped = clean_texts(dev)
    assert dropped == 0
    assert not any(text != text.strip() for text in cleaned.texts)
