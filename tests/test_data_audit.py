"""Splitting, auditing and ``prepare_data``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tuneforge.config import DataConfig
from tuneforge.data import (
    LabelledTexts,
    audit_splits,
    drop_conflicts,
    drop_leaked,
    format_audit,
    prepare_data,
    read_eval_file,
    sort_labels,
    stratified_split,
    stratified_subsample,
)
from tuneforge.errors import DataError


class WordTokenizer:
    """One token per whitespace-separated word, plus [CLS] and [SEP], like a HF tokenizer's call."""

    def __call__(self, texts: list[str], **kwargs: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[101, *range(len(text.split())), 102] for text in texts]}


def make(texts: list[str], labels: list[str], source: str = "mem.csv") -> LabelledTexts:
    return LabelledTexts(texts=list(texts), labels=list(labels), rows=list(range(1, len(texts) + 1)), source=source)


def imbalanced(n_a: int = 80, n_b: int = 20) -> LabelledTexts:
    labels = ["a"] * n_a + ["b"] * n_b
    return make([f"sentence number {i}" for i in range(len(labels))], labels)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["text,label"] + [f'"{text}",{label}' for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_stratified_split_keeps_proportions_and_is_deterministic() -> None:
    data = imbalanced()
    rest, held = stratified_split(data, fraction=0.25, seed=7)
    assert len(held) == 25 and len(rest) == 75
    assert Counter(held.labels) == {"a": 20, "b": 5}
    assert set(rest.texts).isdisjoint(held.texts)
    again_rest, again_held = stratified_split(data, fraction=0.25, seed=7)
    assert again_held.rows == held.rows and again_rest.rows == rest.rows
    _, other = stratified_split(data, fraction=0.25, seed=8)
    assert other.rows != held.rows


def test_stratified_split_with_a_singleton_class() -> None:
    data = make([f"t{i}" for i in range(21)], ["a"] * 10 + ["b"] * 10 + ["lonely"])
    rest, held = stratified_split(data, fraction=0.2, seed=0)
    assert len(rest) + len(held) == 21
    assert "lonely" in rest.labels
    assert {"a", "b"} <= set(held.labels) and {"a", "b"} <= set(rest.labels)


def test_stratified_subsample() -> None:
    data = imbalanced()
    sample = stratified_subsample(data, n=50, seed=1)
    assert Counter(sample.labels) == {"a": 40, "b": 10}
    assert stratified_subsample(data, n=50, seed=1).rows == sample.rows
    assert stratified_subsample(data, n=500, seed=1) is data


def test_audit_counts_duplicates_conflicts_leakage_and_lengths() -> None:
    train = make(
        ["red apple", "red apple", "Red  Apple", "green pear", "green pear", "blue plum is here", "one two"],
        ["fruit", "fruit", "fruit", "fruit", "veg", "fruit", "veg"],
        source="train.csv",
    )
    validation = make(["RED APPLE", "yellow lemon"], ["fruit", "citrus"], source="val.csv")
    report = audit_splits({"train": train, "validation": validation}, tokenizer=WordTokenizer(), max_length=4)
    json.dumps(report)  # must be JSON-serialisable as is
    split = report["splits"]["train"]
    assert split["rows"] == 7
    assert split["class_counts"] == {"fruit": 5, "veg": 2}
    assert split["imbalance_ratio"] == 2.5
    assert split["exact_duplicates"] == 2  # second "red apple", second "green pear"
    assert split["normalised_duplicates"] == 3  # plus "Red  Apple"
    assert split["conflicting_labels"]["count"] == 1
    assert split["conflicting_labels"]["examples"][0]["labels"] == ["fruit", "veg"]
    assert split["conflicting_labels"]["examples"][0]["rows"] == [4, 5]
    lengths = split["token_lengths"]  # word counts + 2: [4, 4, 4, 4, 4, 6, 4]
    assert lengths["p50"] == 4 and lengths["max"] == 6 and lengths["p99"] == 6
    assert lengths["truncated"] == 1
    assert lengths["truncated_share"] == round(1 / 7, 4)
    assert report["leakage"]["validation"]["count"] == 1
    assert report["leakage"]["validation"]["examples"] == [{"text": "RED APPLE", "row": 1}]
    assert report["labels_not_in_train"] == {"validation": ["citrus"]}
    summary = format_audit(report)
    assert "train: 7 rows" in summary and "citrus" in summary
    assert len(summary.splitlines()) <= 6


def test_audit_coverage_counts_unknown_tokens_in_the_same_pass(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # knows the invented English words only
    english = make(["great film", "awful plot"], ["pos", "neg"])
    mixed = make(["great film", "好看"], ["pos", "neg"])  # each CJK character is one [UNK]
    cjk = make(["好看的电影", "无聊"], ["pos", "neg"])
    report = audit_splits({"train": english, "validation": mixed, "test": cjk}, tokenizer=tokenizer)
    coverage = {name: split["coverage"] for name, split in report["splits"].items()}
    assert coverage["train"] == {"unknown_tokens": 0, "unknown_share": 0.0, "chars_per_token": 5.0, "cjk_share": 0.0}
    # 4 content tokens ([CLS]/[SEP] not counted), 2 of them [UNK]; 12 characters, 2 CJK.
    assert coverage["validation"] == {
        "unknown_tokens": 2,
        "unknown_share": 0.5,
        "chars_per_token": 3.0,
        "cjk_share": round(2 / 12, 4),
    }
    assert coverage["test"]["unknown_share"] == 1.0 and coverage["test"]["cjk_share"] == 1.0
    assert report["splits"]["validation"]["token_lengths"]["max"] == 4  # the lengths still count specials
    unknown, few_cjk = report["warnings"]
    assert "validation 50.0%, test 100.0% of the tokens as [UNK]" in unknown
    assert "test 100% of characters" in few_cjk and "has only 0 CJK tokens" in few_cjk
    assert "train" not in unknown and "validation" not in few_cjk  # 17% CJK is not CJK-heavy
    assert unknown.endswith("model.name: multilingual-e5-small")
    summary = format_audit(report)
    assert "validation: " in summary and "3 chars/token, 50.0% unknown, 17% CJK characters" in summary
    assert summary.count("\nwarning: ") == 2


def test_drop_conflicts_and_leaked() -> None:
    train = make(["same words", "Same words", "unique", "also here", "kept"], ["x", "y", "x", "y", "x"])
    fixed, dropped = drop_conflicts(train)
    assert dropped == 2
    assert fixed.texts == ["unique", "also here", "kept"]
    assert fixed.rows == [3, 4, 5]
    cleaned, leaked = drop_leaked(fixed, [make(["ALSO  here"], ["y"]), make(["other"], ["x"])])
    assert leaked == 1
    assert cleaned.texts == ["unique", "kept"]


def test_prepare_data_end_to_end(tmp_path: Path) -> None:
    rows = [(f"good thing {i}", "pos") for i in range(30)] + [(f"bad thing {i}", "neg") for i in range(30)]
    rows += [("   ", "pos"), ("good thing 3", "neg")]  # an empty text and a conflict
    train = write_csv(tmp_path / "train.csv", rows)
    test = write_csv(tmp_path / "test.csv", [("good thing 5", "pos"), ("fresh bad one", "neg")])
    cfg = DataConfig(train=train, test=test, validation_size=0.2, drop_conflicts=True, drop_leaked=True)
    prepared = prepare_data(cfg, seed=3, tokenizer=WordTokenizer(), max_length=16)
    assert prepared.labels == ["neg", "pos"]
    assert prepared.dropped["train_empty"] == 1
    assert prepared.dropped["train_conflicts"] in (0, 2)  # the pair may be split across train/validation
    assert prepared.dropped["train_leaked"] >= 1  # "good thing 5" is in test
    assert "good thing 5" not in prepared.train.texts
    held_out = set(prepared.validation.texts) | set(prepared.test.texts)
    assert held_out.isdisjoint(prepared.train.texts)
    assert len(prepared.validation) == 13
    assert set(prepared.validation.labels) == {"pos", "neg"}
    assert prepared.audit["dropped"] == prepared.dropped
    assert prepared.audit["splits"]["train"]["token_lengths"]["max"] == 5
    again = prepare_data(cfg, seed=3)
    assert again.validation.rows == prepared.validation.rows


def test_prepare_data_single_class(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [(f"happy text {i}", "pos") for i in range(10)])
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(train=train), seed=0)
    assert str(info.value) == f"{train}: only one class ('pos') found; a classifier needs at least two"


def test_prepare_data_unknown_validation_label(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [("warm day", "pos"), ("cold night", "neg")] * 3)
    val = write_csv(tmp_path / "val.csv", [("mild dusk", "pos"), ("grey dawn", "meh")])
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(train=train, validation=val), seed=0)
    message = str(info.value)
    assert message.startswith(f"{val}: row 2: label 'meh'")
    assert "neg, pos" in message
    with pytest.raises(DataError, match=r"row 2: label 'meh'"):
        read_eval_file(val, DataConfig(train=train), ["neg", "pos"])
    ok = read_eval_file(val, DataConfig(train=train), ["meh", "neg", "pos"])
    assert ok.labels == ["pos", "meh"]


def test_sort_labels_numeric() -> None:
    assert sort_labels(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert sort_labels(["b", "a", "10"]) == ["10", "a", "b"]
