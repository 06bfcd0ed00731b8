"""From a ``DataConfig`` to clean, split, audited train/validation/test sets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tuneforge.config import DataConfig
from tuneforge.data.audit import audit_splits, drop_conflicts, drop_leaked
from tuneforge.data.cleaning import clean_text
from tuneforge.data.readers import LabelledTexts, read_labelled_file
from tuneforge.data.splits import stratified_split, stratified_subsample
from tuneforge.errors import DataError

_LABELS_SHOWN = 20


@dataclass
class PreparedData:
    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts | None
    labels: list[str]  # sorted unique train labels; the index is the class id
    audit: dict[str, Any]
    dropped: dict[str, int] = field(default_factory=dict)


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Sorted unique labels; numerically when all are integers, so that "10" comes after "9"."""
    unique = set(labels)
    if unique and all(_is_int(label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _describe_labels(labels: list[str]) -> str:
    shown = ", ".join(labels[:_LABELS_SHOWN])
    if len(labels) > _LABELS_SHOWN:
        shown += f", ... ({len(labels)} in all)"
    return shown


def _row_word(source: str) -> str:
    return "line" if Path(source).suffix.lower() in {".jsonl", ".json"} else "row"


def check_known_labels(data: LabelledTexts, labels: list[str]) -> None:
    """Raise a ``DataError`` naming the first row whose label the model was not trained on."""
    known = set(labels)
    unknown = [i for i, label in enumerate(data.labels) if label not in known]
    if not unknown:
        return
    first = unknown[0]
    more = f"; {len(unknown) - 1} more rows have unknown labels" if len(unknown) > 1 else ""
    raise DataError(
        f"{data.source}: {_row_word(data.source)} {data.rows[first]}: label '{data.labels[first]}' "
        f"is not in the training labels ({_describe_labels(labels)}){more}"
    )


def read_clean_file(path: Path, cfg: DataConfig) -> LabelledTexts:
    """A labelled file read as ``cfg`` says and cleaned as training cleans it; empty texts are dropped (counted
    in ``read_counts["empty_texts"]``), a file with none left is a :class:`DataError`."""
    # Cleaned while read, so the raw texts of a large file are never all in memory next to the clean ones.
    data = read_labelled_file(
        path,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        encoding=cfg.encoding,
        format=cfg.format,
        clean=partial(clean_text, lowercase=cfg.lowercase, chinese_script=cfg.chinese_script),
    )
    if not len(data):
        raise DataError(f"{data.source}: all {data.read_counts.get('empty_texts', 0):,} texts are empty after cleaning")
    return data


def _read_clean(path: Path, cfg: DataConfig, dropped: dict[str, int], name: str) -> LabelledTexts:
    data = read_clean_file(path, cfg)
    dropped[f"{name}_empty"] = data.read_counts.get("empty_texts", 0)
    return data


def _move_unseen_to_train(train: LabelledTexts, validation: LabelledTexts) -> tuple[LabelledTexts, LabelledTexts]:
    # Only the unstratified fallback can put every example of a class into the split-off validation
    # part; moving those rows back is better than failing on labels the user never got wrong.
    known = set(train.labels)
    back = [i for i, label in enumerate(validation.labels) if label not in known]
    if not back or len(back) == len(validation):
        return train, validation
    moved = validation.subset(back)
    back_set = set(back)
    stay = validation.subset(i for i in range(len(validation)) if i not in back_set)
    merged = LabelledTexts(
        texts=train.texts + moved.texts,
        labels=train.labels + moved.labels,
        rows=train.rows + moved.rows,
        source=train.source,
    )
    return merged, stay


def prepare_data(cfg: DataConfig, *, seed: int, tokenizer: Any = None, max_length: int | None = None) -> PreparedData:
    """Read, clean, subsample, split, fix and audit the data a run trains on.

    ``dropped`` counts rows removed at each step (``train_empty``, ``train_subsampled``,
    ``train_conflicts``, ``train_leaked``, ...); the audit reports the data after these fixes, and
    under ``reading`` what reading each file skipped or changed (blank lines, labels normalised, ...).
    """
    dropped: dict[str, int] = {}
    train = _read_clean(cfg.train, cfg, dropped, "train")
    validation = _read_clean(cfg.validation, cfg, dropped, "validation") if cfg.validation else None
    test = _read_clean(cfg.test, cfg, dropped, "test") if cfg.test else None
    # Taken now: the counts describe the files as read, and splitting makes new LabelledTexts.
    reading = {
        name: data.read_counts
        for name, data in (("train", train), ("validation", validation), ("test", test))
        if data is not None
    }

    if cfg.max_train_rows is not None and len(train) > cfg.max_train_rows:
        before = len(train)
        train = stratified_subsample(train, n=cfg.max_train_rows, seed=seed)
        dropped["train_subsampled"] = before - len(train)

    validation_from_train = validation is None
    if validation is None:
        train, validation = stratified_split(train, fraction=cfg.validation_size, seed=seed)
        train, validation = _move_unseen_to_train(train, validation)

    if cfg.drop_conflicts:
        train, dropped["train_conflicts"] = drop_conflicts(train)
    if cfg.drop_leaked:
        others = [validation] + ([test] if test is not None else [])
        train, dropped["train_leaked"] = drop_leaked(train, others)
    if not len(train):
        raise DataError(f"{train.source}: no training rows left after dropping conflicts and leaked texts")

    # Check before the audit: tokenising everything only to fail afterwards would waste minutes.
    labels = sort_labels(train.labels)
    if len(labels) < 2:
        raise DataError(f"{train.source}: only one class ('{labels[0]}') found; a classifier needs at least two")
    check_known_labels(validation, labels)
    if test is not None:
        check_known_labels(test, labels)

    splits = {"train": train, "validation": validation}
    if test is not None:
        splits["test"] = test
    audit = audit_splits(splits, tokenizer=tokenizer, max_length=max_length)
    audit["dropped"] = dict(dropped)
    audit["reading"] = reading
    audit["validation_from_train"] = validation_from_train
    if validation_from_train:
        audit["validation_size"] = cfg.validation_size
    return PreparedData(train=train, validation=validation, test=test, labels=labels, audit=audit, dropped=dropped)


def read_eval_file(path: str | Path, cfg: DataConfig, labels: list[str]) -> LabelledTexts:
    """Read and clean a labelled file for evaluation; every label must be one the model knows."""
    dropped: dict[str, int] = {}
    data = _read_clean(Path(path), cfg, dropped, "eval")
    check_known_labels(data, labels)
    return data
