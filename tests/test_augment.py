"""Augmentation: each operation's invariants, neighbour substitution, the label filter, balancing, the CLI."""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import make_rows, write_csv
from tuneforge.augment import AugmentOptions, EmbeddingNeighbours, LabelFilter, augment_texts, load_neighbours
from tuneforge.cli import main
from tuneforge.config import RunConfig
from tuneforge.data.augment import (
    MODEL_FREE_OPERATIONS,
    STOP_WORDS,
    apply_operation,
    generate_candidates,
    is_cjk,
    is_cjk_text,
    parse_operations,
    rng_for,
)
from tuneforge.data.cleaning import normalise_for_matching
from tuneforge.data.readers import read_labelled_file
from tuneforge.data.segment import chinese_pieces
from tuneforge.errors import DataError
from tuneforge.train.extra_texts import augment_options

ENGLISH = [text for text, _ in make_rows(30, seed=5)]
CHINESE = [
    "外卖送得太慢了，iPhone充电器也没送到，差评100分",
    "味道不错，分量很足，下次还会再点",
    "饭菜都凉了，送餐员态度也很差",
    "包装很好，KFC的薯条还是热的",
]


_CJK_RANGE = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
_CJK_RUN = f"[{_CJK_RANGE}]+"


def _non_cjk_runs(text: str) -> list[str]:
    return [run for run in re.split(_CJK_RUN, text) if run]


# --- operations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", MODEL_FREE_OPERATIONS)
def test_operations_are_seeded(operation: str) -> None:
    texts, labels = ENGLISH, ["x"] * len(ENGLISH)
    first = generate_candidates(texts, labels, [operation], copies=2, seed=3)
    again = generate_candidates(texts, labels, [operation], copies=2, seed=3)
    other = generate_candidates(texts, labels, [operation], copies=2, seed=4)
    assert first and first == again
    assert [c.text for c in first] != [c.text for c in other]
    # A text's copy depends on the text alone, not on the texts around it or their order.
    reordered = generate_candidates(texts[::-1], labels, [operation], copies=2, seed=3)
    assert {c.text for c in reordered} == {c.text for c in first}


def test_word_operation_invariants() -> None:
    for text in ENGLISH:
        words = text.split()

        def rng(op: str, text: str = text) -> random.Random:
            return rng_for(1, op, 0, text)

        swapped = apply_operation("swap", text, rng("swap"), rate=0.3).split()
        assert Counter(swapped) == Counter(words)
        deleted = apply_operation("delete", text, rng("delete"), rate=0.3).split()
        assert 1 <= len(deleted) < len(words)
        it = iter(words)
        assert all(word in it for word in deleted)  # what is left keeps its order
        inserted = apply_operation("insert", text, rng("insert"), rate=0.3).split()
        assert len(inserted) > len(words)
        assert set(inserted) <= set(words)  # only the text's own words
        typo = apply_operation("typo", text, rng("typo"), rate=0.3)
        assert typo != text and abs(len(typo) - len(text)) <= len(words)
        assert re.sub(r"[a-z]", "", typo) == re.sub(r"[a-z]", "", text)  # digits and spaces untouched
        cased = apply_operation("case", text.capitalize(), rng("case"))
        assert cased != text.capitalize() and cased.lower() == text.capitalize().lower()


def test_generated_copies_keep_labels_and_have_no_duplicates() -> None:
    rows = make_rows(60, seed=9)
    texts = [t for t, _ in rows] + ["the film"]  # too short for most operations: dropped as unchanged
    labels = [label for _, label in rows] + ["meh"]
    result = augment_texts(texts, labels, AugmentOptions(copies=4, seed=2, rate=0.3))
    report = result.report["operations"]
    augmented = list(zip(result.texts, result.labels, result.operations, strict=True))[len(texts) :]
    by_text = dict(zip(texts, labels, strict=True))
    for operation in MODEL_FREE_OPERATIONS:
        tally = report[operation]
        assert tally["generated"] == 4 * len(texts)
        assert tally["kept"] == sum(op == operation for *_, op in augmented)
        assert tally["kept"] + sum(tally["dropped"].values()) == tally["generated"]
        assert tally["dropped"].get("duplicate", 0) > 0 or operation == "typo"  # 4 copies of short texts repeat
    originals = {normalise_for_matching(t) for t in texts}
    keys = [normalise_for_matching(t) for t, _, op in augmented if op != "case"]
    assert len(keys) == len(set(keys)) and not set(keys) & originals
    exact = [t for t, *_ in augmented]
    assert len(exact) == len(set(exact)) and not set(exact) & set(texts)
    assert result.report["augmented"] == len(augmented) > 0
    # Every copy carries the label of the text it came from (deletion keeps a word of the text, etc.).
    for text, label, operation in augmented:
        if operation == "swap":
            (source,) = [t for t in texts if Counter(t.split()) == Counter(text.split())][:1]
            assert by_text[source] == label


def test_cjk_texts_get_character_operations_within_cjk() -> None:
    assert all(is_cjk_text(t) for t in CHINESE) and not any(is_cjk_text(t) for t in ENGLISH)
    for text in CHINESE:
        cjk = Counter(c for c in text if is_cjk(c))
        for seed in range(5):
            for operation in ("swap", "delete", "insert"):
                new = apply_operation(operation, text, rng_for(seed, operation, 0, text), rate=0.2)
                assert new != text
                # The non-CJK runs (brand names, numbers, punctuation) stay whole (never cut by an inserted
                # character; a deletion may join two) and in order.
                runs, new_runs = _non_cjk_runs(text), _non_cjk_runs(new)
                assert "".join(new_runs) == "".join(runs)
                assert all(any(run in joined for joined in new_runs) for run in runs)
                new_cjk = Counter(c for c in new if is_cjk(c))
                if operation == "swap":
                    assert new_cjk == cjk
                elif operation == "delete":
                    assert not new_cjk - cjk and sum(new_cjk.values()) < sum(cjk.values())
                else:
                    assert set(new_cjk) <= set(cjk) and sum(new_cjk.values()) > sum(cjk.values())
            for operation in ("typo", "case"):
                assert apply_operation(operation, text, rng_for(seed, operation, 0, text)) == text


def _word_pieces(text: str) -> list[str]:
    """jieba's words of ``text``, cut where the script changes: the units word-level CJK augmentation uses."""
    return [run for word in chinese_pieces(text) for run in re.findall(f"{_CJK_RUN}|[^{_CJK_RANGE}]+", word)]


def _built_from(new: str, pieces: list[str], *, droppable: bool = False, extra: frozenset[str] = frozenset()) -> bool:
    """Whether ``new`` is ``pieces`` in order, with CJK pieces left out (``droppable``) or the strings of
    ``extra`` put in between: what deleting or inserting whole words can make, and nothing else."""

    @functools.cache
    def rest(i: int, j: int) -> bool:
        if i == len(pieces) and j == len(new):
            return True
        if i < len(pieces) and new.startswith(pieces[i], j) and rest(i + 1, j + len(pieces[i])):
            return True
        if i < len(pieces) and droppable and is_cjk(pieces[i][0]) and rest(i + 1, j):
            return True
        return any(new.startswith(word, j) and rest(i, j + len(word)) for word in extra)

    return rest(0, 0)


def test_cjk_word_units_move_drop_and_repeat_whole_words() -> None:
    pytest.importorskip("jieba", reason="jieba (the zh extra) is not installed")
    broken = {"characters": 0, "words": 0}
    changed = {"characters": 0, "words": 0}
    for text in CHINESE:
        pieces = _word_pieces(text)
        words = [p for p in pieces if is_cjk(p[0])]
        assert "".join(pieces) == text and any(len(w) > 1 for w in words)
        for seed in range(5):
            for units in ("characters", "words"):
                swapped = apply_operation("swap", text, rng_for(seed, "swap", 0, text), rate=0.3, cjk_units=units)
                deleted = apply_operation("delete", text, rng_for(seed, "delete", 0, text), rate=0.3, cjk_units=units)
                inserted = apply_operation("insert", text, rng_for(seed, "insert", 0, text), rate=0.3, cjk_units=units)
                whole = (
                    Counter(swapped) == Counter(text)
                    and all(word in swapped for word in words)
                    and _non_cjk_runs(swapped) == _non_cjk_runs(text)
                    and _built_from(deleted, pieces, droppable=True)
                    and _built_from(inserted, pieces, extra=frozenset(words))
                )
                # Two swaps may undo each other (as in EDA); deletion and insertion always change something.
                assert deleted != text and inserted != text
                changed[units] += swapped != text
                if units == "words":
                    assert whole, (text, swapped, deleted, inserted)
                broken[units] += not whole
    # The default acts on characters, so it does cut words: the check above is not true of any output.
    assert broken == {"characters": broken["characters"], "words": 0} and broken["characters"] > 0
    assert changed["words"] >= 0.8 * len(CHINESE) * 5
    # Seeded like the character operations; English text is not touched by the choice.
    again = generate_candidates(CHINESE, ["x"] * 4, ["swap", "delete"], seed=2, cjk_units="words")
    assert again == generate_candidates(CHINESE, ["x"] * 4, ["swap", "delete"], seed=2, cjk_units="words")
    assert again != generate_candidates(CHINESE, ["x"] * 4, ["swap", "delete"], seed=2)
    english = generate_candidates(ENGLISH, ["x"] * len(ENGLISH), ["swap", "insert"], seed=2, cjk_units="words")
    assert english == generate_candidates(ENGLISH, ["x"] * len(ENGLISH), ["swap", "insert"], seed=2)


def test_cjk_units_through_the_pipeline_config_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("jieba", reason="jieba (the zh extra) is not installed")
    options = AugmentOptions(operations=("swap", "delete", "insert"), cjk_units="words", rate=0.3)
    result = augment_texts(CHINESE, ["neg", "pos", "neg", "pos"], options)
    assert result.report["options"]["cjk_units"] == "words" and result.report["augmented"] > 0
    assert result.report["warnings"] == []
    with pytest.raises(DataError, match="CJK units: unknown 'syllables'"):
        AugmentOptions(cjk_units="syllables").check()
    with pytest.raises(DataError, match="CJK units: unknown 'syllables'"):
        generate_candidates(CHINESE, ["x"] * 4, ["swap"], cjk_units="syllables")
    # The config's key, validated by the schema, reaches the options training uses.
    raw = {"model": {"name": "minilm-l6"}, "data": {"train": "t.csv", "augment": {"cjk_units": "words"}}}
    config = RunConfig.model_validate(raw)
    assert augment_options(config.data.augment, config).cjk_units == "words"
    raw["data"]["augment"]["cjk_units"] = "syllables"
    with pytest.raises(ValidationError, match="cjk_units"):
        RunConfig.model_validate(raw)
    data = write_csv(tmp_path / "zh.csv", [(t, "neg" if i % 2 else "pos") for i, t in enumerate(CHINESE)])
    out = tmp_path / "zh_aug.csv"
    assert (
        main(["augment", str(data), "--out", str(out), "--ops", "delete", "--cjk-units", "words", "--no-progress"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["cjk_units"] == "words" and report["augmented"] == 4
    written = read_labelled_file(out).texts  # the originals as cleaned (NFKC: full-width commas), then copies
    sources, copies = written[:4], written[4:]
    assert all(_built_from(c, _word_pieces(source), droppable=True) for c, source in zip(copies, sources, strict=True))


def test_chinese_augmented_by_characters_is_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = ["neg", "pos", "neg", "pos"]
    chars = augment_texts(CHINESE, labels, AugmentOptions(operations=("typo", "swap", "delete"), rate=0.3))
    [warning] = chars.report["warnings"]
    assert warning.startswith("4 of 4 texts are Chinese, Japanese or Korean, and delete, swap act on single")
    assert "cjk_units: words" in warning
    # Not warned: operations that leave Chinese alone, texts that are mostly not CJK.
    assert augment_texts(CHINESE, labels, AugmentOptions(operations=("typo", "case"))).report["warnings"] == []
    mixed = [CHINESE[0], *ENGLISH[:2]]
    assert augment_texts(mixed, ["a", "b", "a"], AugmentOptions(operations=("swap",))).report["warnings"] == []

    data = write_csv(tmp_path / "zh.csv", list(zip(CHINESE, labels, strict=True)))
    assert main(["augment", str(data), "--out", str(tmp_path / "out.csv"), "--ops", "swap", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warnings"] == [warning.replace("delete, swap", "swap")]
    assert "warning: 4 of 4 texts are Chinese" in " ".join(captured.err.split())


# --- neighbours ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_neighbours(tiny_model_dir: Path) -> EmbeddingNeighbours:
    return load_neighbours(tiny_model_dir, k=3)


def test_neighbour_substitution_touches_only_content_words(tiny_neighbours: EmbeddingNeighbours) -> None:
    vocabulary = tiny_neighbours.vocabulary
    assert vocabulary and not vocabulary & STOP_WORDS
    assert all(w.isalpha() and len(w) >= 3 for w in vocabulary)
    assert tiny_neighbours("lovely") and "lovely" not in tiny_neighbours("lovely")
    assert tiny_neighbours("zebra") == ()  # not one token: split into pieces, so no neighbours
    text = (
        "Great film, the acting was superb and Plot 42 by Dreadful Studios at bob@plot.com order A12345 really lovely"
    )
    protected = {
        "the",
        "was",
        "and",
        "42",
        "Plot",
        "Dreadful",
        "Studios",
        "bob@plot.com",
        "A12345",
        "really",
        "at",
        "by",
    }
    changed = set()
    for seed in range(8):
        new = apply_operation(
            "neighbour", text, rng_for(seed, "neighbour", 0, text), rate=1.0, neighbours=tiny_neighbours
        )
        old_tokens, new_tokens = text.split(" "), new.split(" ")
        assert len(old_tokens) == len(new_tokens)
        for old, replaced in zip(old_tokens, new_tokens, strict=True):
            if old.strip(",") in protected:
                assert replaced == old
            elif replaced != old:
                changed.add(old)
                word = replaced.strip(",")
                assert word.lower() in vocabulary and word.lower() in tiny_neighbours(old.strip(",").lower())
                assert word[0].isupper() == old[0].isupper()  # sentence-initial capital kept
    assert changed >= {"superb", "lovely"}


def test_neighbour_operation_needs_a_model() -> None:
    with pytest.raises(DataError, match="neighbour"):
        AugmentOptions(operations=("neighbour",)).check()
    with pytest.raises(DataError, match="neighbour"):
        generate_candidates(ENGLISH, ["x"] * len(ENGLISH), ["neighbour"])


# --- label filter and balancing -------------------------------------------------------------------


def test_label_filter_drops_what_the_model_disagrees_with(trained_tiny_run: Path) -> None:
    rows = make_rows(45, seed=21)
    texts, labels = [t for t, _ in rows], [label for _, label in rows]
    label_filter = LabelFilter(trained_tiny_run, 0.0)
    unfiltered = augment_texts(texts, labels, AugmentOptions(copies=2, seed=1, rate=0.3), label_filter=label_filter)
    copies = unfiltered.texts[len(texts) :]
    copy_labels = unfiltered.labels[len(texts) :]
    probabilities = label_filter.probabilities(copies, copy_labels, lambda n: None)
    threshold = sorted(probabilities)[len(probabilities) // 2]  # the median: about half must go
    below = sum(p < threshold for p in probabilities)
    assert 0 < below < len(probabilities)

    options = AugmentOptions(copies=2, seed=1, rate=0.3, filter_run=trained_tiny_run, min_probability=threshold)
    filtered = augment_texts(texts, labels, options)
    expected = [c for c, p in zip(copies, probabilities, strict=True) if p >= threshold]
    assert filtered.texts[: len(texts)] == texts
    assert filtered.texts[len(texts) :] == expected
    dropped = sum(t["dropped"].get("low_probability", 0) for t in filtered.report["operations"].values())
    assert dropped == below
    assert filtered.report["filter"] == {"run": str(trained_tiny_run), "min_probability": threshold}


def test_filter_run_with_other_labels_is_refused(trained_tiny_run: Path) -> None:
    options = AugmentOptions(filter_run=trained_tiny_run)
    with pytest.raises(DataError, match=r"'angry'.*happy"):
        augment_texts(["the film was awful", "so lovely a story"], ["angry", "happy"], options)


def test_balancing_augments_only_small_classes() -> None:
    rows = make_rows(40, seed=3, labels=("happy", "happy", "happy", "sad"))
    texts, labels = [t for t, _ in rows], [label for _, label in rows]
    result = augment_texts(texts, labels, AugmentOptions(copies=2, balance_below=15))
    added = Counter(result.labels[len(texts) :])
    assert set(added) == {"sad"} and added["sad"] > 0
    assert result.report["per_label"]["happy"] == {"original": 30, "augmented": 0, "was_augmented": False}


# --- bad input and the command line ---------------------------------------------------------------


def test_bad_options_are_refused() -> None:
    with pytest.raises(DataError, match=r"unknown 'shuffle'.*swap"):
        parse_operations("swap,shuffle")
    with pytest.raises(DataError, match="copies: must be at least 1"):
        AugmentOptions(copies=0).check()
    with pytest.raises(DataError, match="rate"):
        generate_candidates(ENGLISH, ["x"] * len(ENGLISH), ["swap"], rate=0.0)


def test_cli_writes_rows_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_csv(tmp_path / "train.csv", make_rows(30, seed=4))
    out = tmp_path / "aug.jsonl"
    code = main(
        ["augment", str(data), "--out", str(out), "--ops", "swap,delete,typo", "--copies", "2", "--no-progress"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "aug.augment.json").read_text(encoding="utf-8"))
    written = read_labelled_file(out)
    assert len(written) == report["rows"] == 30 + report["augmented"]
    assert set(report["operations"]) == {"swap", "delete", "typo"}
    operations = Counter(json.loads(line)["augmentation"] for line in out.read_text(encoding="utf-8").splitlines())
    assert operations["original"] == 30
    assert all(operations[op] == report["operations"][op]["kept"] for op in ("swap", "delete", "typo"))
    # The same command with the same seed writes the same file.
    first = out.read_bytes()
    assert (
        main(["augment", str(data), "--out", str(out), "--ops", "swap,delete,typo", "--copies", "2", "--no-progress"])
        == 0
    )
    assert out.read_bytes() == first

    # A config names the file and its columns.
    write_csv(tmp_path / "cols.csv", make_rows(12, seed=6), header=("review", "stars"))
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {name: minilm-l6}\ndata: {train: cols.csv, text_column: review, label_column: stars}\n",
        encoding="utf-8",
    )
    csv_out = tmp_path / "cols_aug.csv"
    assert main(["augment", str(config), "--out", str(csv_out), "--ops", "insert", "--no-progress"]) == 0
    written = read_labelled_file(csv_out, text_column="review", label_column="stars")
    assert len(written) > 12


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("", [], "file is empty"),
        ("text,label\n", [], "no data rows"),
        ("text,label\nthe film was great,happy\n", ["--ops", "swap,blur"], "unknown 'blur'"),
        ("text,label\nthe film was great,happy\n", ["--copies", "0"], "copies: must be at least 1"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, extra: list[str], message: str
) -> None:
    data = tmp_path / "in.csv"
    data.write_text(content, encoding="utf-8")
    code = main(["augment", str(data), "--out", str(tmp_path / "out.csv"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.csv").exists()


def test_cli_neighbours_from_the_filter_run(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_csv(tmp_path / "train.csv", make_rows(24, seed=8))
    out = tmp_path / "aug.csv"
    argv = ["augment", str(data), "--out", str(out), "--ops", "neighbour", "--rate", "0.5", "--no-progress"]
    assert main([*argv, "--filter-run", str(trained_tiny_run), "--min-probability", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["neighbour_model"] == str(trained_tiny_run)
    assert report["operations"]["neighbour"]["kept"] == report["augmented"] > 0
    # Without a model to take embeddings from, the operation is refused before any work.
    assert main(argv) == 2
    assert "neighbour" in capsys.readouterr().err
