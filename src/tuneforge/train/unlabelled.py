"""Texts without labels: what self-training pseudo-labels and what a distillation teacher labels.

Read with prediction's reader (``.txt`` one text a line, ``.csv``/``.tsv``/``.jsonl``/``.parquet`` with
the data's text column), cleaned exactly as training cleans its texts, blank texts and repeats dropped.
A file that carries the label column is refused: labelled rows belong in ``data.train``, and treating
them as unlabelled would silently throw their labels away.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tuneforge.config import DataConfig
from tuneforge.data.cleaning import clean_text
from tuneforge.errors import DataError
from tuneforge.infer.stream import TextSource


def read_unlabelled_texts(path: Path, cfg: DataConfig, *, key: str = "data.unlabeled") -> list[str]:
    """The distinct, cleaned, non-empty texts of ``path`` in file order; ``key`` names the option in errors."""
    path = Path(path)
    try:
        source = TextSource(path, text_column=cfg.text_column, encoding=cfg.encoding)
        if _label_column_present(path, source.format, cfg):
            raise DataError(
                f"{path}: has a label column '{cfg.label_column}'; {key} takes texts without labels "
                "(put labelled rows in data.train, or drop the column)"
            )
        seen: set[str] = set()
        texts = []
        for _, raw in source:
            text = clean_text(raw, lowercase=cfg.lowercase, chinese_script=cfg.chinese_script)
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
    except DataError as exc:
        raise DataError(f"{key}: {exc}") from None
    if not texts:
        raise DataError(f"{key}: {path} holds no texts")
    return texts


def _label_column_present(path: Path, fmt: str, cfg: DataConfig) -> bool:
    """Whether the file's header (CSV/TSV, Parquet) or first record (JSONL) has the label column."""
    if fmt == "txt":
        return False
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return cfg.label_column in pq.read_schema(path).names
    with path.open(encoding=cfg.encoding, errors="replace", newline="") as handle:
        if fmt in ("csv", "tsv"):
            header = next(csv.reader(handle, delimiter="," if fmt == "csv" else "\t"), [])
            return cfg.label_column in [name.strip().lstrip("\ufeff") for name in header]
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the reader reports the bad line with its number
                return isinstance(record, dict) and cfg.label_column in record
    return False
