"""tuneforge analyze: error analysis (confused pairs, confident mistakes, calibration per class), probable
label errors from out-of-sample probabilities, the HTML report and the suspects CSV, and bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_rows, tiny_config, write_csv
from tuneforge.apps.analyze import AnalyzeOptions, analyze
from tuneforge.apps.analyze.figures import (
    confident_mistakes,
    confused_pairs,
    per_class,
    summary,
)
from tuneforge.apps.analyze.label_errors import (
    FILTERS,
    check_folds,
    cross_validated_probabilities,
    find_label_issues,
    suspects_from,
)
from tuneforge.apps.analyze.report import SUSPECT_COLUMNS, render_html, write_suspects_csv
from tuneforge.cli import main
from tuneforge.errors import DataError

LABELS = ("happy", "sad", "meh")


def _flip(rows: list[tuple[str, str]], every: int, start: int) -> tuple[list[tuple[str, str]], set[int]]:
    """``rows`` with the label of every ``every``-th row (from ``start``) moved to the next label."""
    flipped = set(range(start, len(rows), every))
    out = [
        (text, LABELS[(LABELS.index(label) + 1) % len(LABELS)]) if i in flipped else (text, label)
        for i, (text, label) in enumerate(rows)
    ]
    return out, flipped


# --- the finder on features with a known answer ---------------------------------------------------------
def _clusters(n: int = 600, k: int = 6, d: int = 16, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (k, d))
    truth = np.arange(n) % k
    features = centres[truth] + rng.normal(0.0, 0.45, (n, d))
    given = truth.copy()
    flipped = rng.choice(n, int(n * noise), replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, k, len(flipped))) % k
    return features, given, truth, set(flipped.tolist())


def test_cross_validated_finder_ranks_the_flipped_labels_first() -> None:
    features, given, truth, flipped = _clusters()
    probabilities = cross_validated_probabilities(features, given, 6, folds=5)
    assert probabilities.shape == (600, 6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    found = find_label_issues(given, probabilities)
    top = set(found[: len(flipped)].tolist())
    assert len(top & flipped) / len(flipped) >= 0.8  # precision at k = the number flipped
    chosen = set(found.tolist())
    assert len(chosen & flipped) / len(chosen) >= 0.8  # precision of cleanlab's own set
    assert len(chosen & flipped) / len(flipped) >= 0.7  # its recall
    # Ranked by the probability of the given label, lowest first.
    given_p = probabilities[found, given[found]]
    assert np.all(np.diff(given_p) >= -1e-12)
    names = [f"c{k}" for k in range(6)]
    suspects = suspects_from(found, probabilities, given, names, [f"t{i}" for i in range(600)], list(range(2, 602)))
    for suspect in suspects:
        assert suspect.suggested_label != suspect.given_label
        assert suspect.row == suspect.index + 2 and suspect.text == f"t{suspect.index}"
        assert suspect.confidence == pytest.approx(probabilities[suspect.index, names.index(suspect.suggested_label)])
    # The suggestion is the label the row had before it was flipped, for nearly all of them.
    right = sum(names.index(s.suggested_label) == truth[s.index] for s in suspects if s.index in flipped)
    assert right >= 0.9 * len(chosen & flipped)


def test_finder_works_on_a_file_holding_some_of_the_labels() -> None:
    # Column 3 of 4 is absent from the labels: cleanlab would need every column present.
    rng = np.random.default_rng(1)
    given = np.arange(90) % 3
    probabilities = np.full((90, 4), 0.02)
    probabilities[np.arange(90), given] = 0.94
    probabilities = probabilities + rng.uniform(0, 0.01, probabilities.shape)
    # Given 2, surely 1: more sure than any row given 1 (cleanlab counts a row for the class whose average
    # self-confidence it reaches).
    probabilities[5] = [0.001, 0.997, 0.001, 0.001]
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    found = find_label_issues(given, probabilities)
    assert found.tolist() == [5]
    with pytest.raises(DataError, match="single label"):
        find_label_issues(np.zeros(10, dtype=int), probabilities[:10])
    with pytest.raises(DataError, match="filter_by"):
        find_label_issues(given, probabilities, filter_by="nonsense")


def test_folds_fall_back_to_the_smallest_label_and_refuse_a_single_text() -> None:
    names = ["a", "b", "c"]
    assert check_folds([0] * 10 + [1] * 10 + [2] * 10, 5, names) == 5
    assert check_folds([0] * 10 + [1] * 10 + [2] * 3, 5, names) == 3
    with pytest.raises(DataError, match=r"1 label\(s\) have a single text \('c'\)"):
        check_folds([0] * 10 + [1] * 10 + [2], 5, names)
    with pytest.raises(DataError, match="at least 2"):
        check_folds([0, 0, 1, 1], 1, names)


# --- the figures ----------------------------------------------------------------------------------------
def test_confusions_mistakes_and_calibration_per_class() -> None:
    names = ["a", "b", "c"]
    given = [0, 0, 0, 1, 1, 2, 2, 2]
    p = np.array(
        [
            [0.9, 0.1, 0.0],
            [0.2, 0.7, 0.1],  # a answered b, 0.7
            [0.1, 0.9, 0.0],  # a answered b, 0.9: the most confident mistake
            [0.2, 0.8, 0.0],
            [0.6, 0.4, 0.0],  # b answered a, 0.6
            [0.0, 0.2, 0.8],
            [0.0, 0.0, 1.0],
            [0.0, 0.5, 0.5],  # a tie: argmax picks b (the first), 0.5
        ]
    )
    predicted = p.argmax(axis=1)
    pairs = confused_pairs(given, predicted, names)
    assert [(x.a, x.b, x.a_as_b, x.b_as_a, x.total) for x in pairs] == [("a", "b", 2, 1, 3), ("b", "c", 0, 1, 1)]
    texts, rows = [f"t{i}" for i in range(8)], list(range(1, 9))
    mistakes = confident_mistakes(p, given, names, texts, rows, top=3)
    assert [(m.index, m.predicted_label, m.confidence) for m in mistakes] == [
        (2, "b", 0.9),
        (1, "b", 0.7),
        (4, "a", 0.6),
    ]
    assert mistakes[0].given_probability == pytest.approx(0.1) and mistakes[0].row == 3
    classes = {row["label"]: row for row in per_class(p, given, names)}
    assert (
        classes["a"]["support"] == 3
        and classes["a"]["answered"] == 2
        and classes["a"]["recall"] == pytest.approx(1 / 3)
    )
    assert classes["a"]["precision"] == pytest.approx(0.5)
    assert classes["a"]["confidence"] == pytest.approx(0.75)
    assert classes["a"]["overconfidence"] == pytest.approx(0.25)
    assert classes["c"]["precision"] == 1.0 and classes["c"]["overconfidence"] == pytest.approx(-0.1)
    assert all(0.0 <= row["classwise_ece"] <= 1.0 for row in classes.values())
    figures = summary(p, given, names)
    assert figures["n"] == 8 and figures["accuracy"] == 50.0
    # A one-hot model that is always right is perfectly calibrated, overall and per class.
    exact = np.eye(3)[[0, 1, 2, 0]]
    assert summary(exact, [0, 1, 2, 0], names)["ece"] == 0.0
    assert all(row["classwise_ece"] == 0.0 for row in per_class(exact, [0, 1, 2, 0], names))


# --- end to end on a tiny run that learned something --------------------------------------------------
@pytest.fixture(scope="module")
def noisy_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny run trained (8 epochs: it learns this invented data) on 150 texts, 10 of them mislabelled."""
    from tuneforge.config import validate_config
    from tuneforge.train.loop import train

    folder = tmp_path_factory.mktemp("noisy-run")
    rows, flipped = _flip(make_rows(150, seed=21), every=15, start=4)
    data = {"train": write_csv(folder / "noisy.csv", rows)}
    run = train(validate_config(tiny_config(tiny_model_dir, data, folder / "run", epochs=8)), show_progress=False)
    return {"run": run.run_dir, "train": data["train"], "rows": rows, "flipped": flipped, "folder": folder}


def test_training_data_suspects_are_the_flipped_rows(noisy_run: dict, tmp_path: Path) -> None:
    analysis = analyze(noisy_run["run"], noisy_run["train"], AnalyzeOptions(explain=0))
    assert analysis.mode == "training" and analysis.folds == 5  # auto: the file the run trained on
    flipped = noisy_run["flipped"]
    found = [s.index for s in analysis.suspects]
    assert len(found) >= 4
    assert len(set(found) & flipped) / len(found) >= 0.8
    ranked = set(found[: len(flipped)])
    assert len(ranked & flipped) >= 0.5 * min(len(found), len(flipped))
    for suspect in analysis.suspects:
        assert suspect.row == suspect.index + 1  # CSV data rows, header excluded
        assert noisy_run["rows"][suspect.index] == (suspect.text, suspect.given_label)


def test_cli_writes_the_report_the_suspects_and_the_data_without_them(noisy_run: dict, tmp_path: Path, capsys) -> None:
    html, suspects, clean = tmp_path / "report.html", tmp_path / "suspects.csv", tmp_path / "clean.csv"
    code = main(
        [
            "analyze", str(noisy_run["run"]), "--data", str(noisy_run["train"]), "--training-data",
            "--html", str(html), "--suspects", str(suspects), "--drop-suspects", str(clean), "--json", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["mode"] == "training" and figures["summary"]["n"] == 150
    with suspects.open(encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0].keys()) == SUSPECT_COLUMNS
    assert len(table) == figures["suspects"] > 0
    rows = noisy_run["rows"]
    for record in table:
        assert rows[int(record["row"]) - 1] == (record["text"], record["given_label"])
        assert record["suggested_label"] in LABELS and record["suggested_label"] != record["given_label"]
        assert 0.0 < float(record["confidence"]) <= 1.0
    with clean.open(encoding="utf-8", newline="") as handle:
        kept = [(r["text"], r["label"]) for r in csv.DictReader(handle)]
    dropped = {int(r["row"]) for r in table}
    assert kept == [row for i, row in enumerate(rows, start=1) if i not in dropped]
    assert figures["files"]["without_suspects"] == {"path": str(clean), "kept": len(kept), "dropped": len(dropped)}
    page = html.read_text(encoding="utf-8")
    _check_offline_page(page)
    assert "Probable label errors" in page and "Most confused label pairs" in page
    assert table[0]["text"] in page


def _check_offline_page(page: str) -> None:
    """Opens with no network: no URL, no script, nothing loaded from elsewhere."""
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"(?i)https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page)
    assert not re.search(r"(?i)<script|<link|<img|<iframe|@import|url\(", page)


def test_report_escapes_the_users_texts(noisy_run: dict, tmp_path: Path) -> None:
    # Happy texts labelled sad: mistakes the report shows, with markup and a link in them.
    rows = [(f"<script>alert({i})</script> great lovely superb <b>{i}</b>", "sad") for i in range(3)]
    rows += [(f"great lovely fantastic <a href='https://example.com'>{i}</a>", "sad") for i in range(3)]
    rows += make_rows(30, seed=26)
    data = write_csv(tmp_path / "held.csv", rows)
    analysis = analyze(noisy_run["run"], data, AnalyzeOptions(explain=0))
    assert analysis.mode == "held_out"
    assert {m.index for m in analysis.mistakes} >= set(range(6))
    page = render_html(analysis)
    assert "&lt;script&gt;alert(0)&lt;/script&gt;" in page and "&lt;a href=&#x27;https://example.com&#x27;&gt;" in page
    assert "<b>0</b>" not in page and not re.search(r"(?i)<script|<link|<img|<iframe|<a |href=[\"']|src=[\"']", page)
    path = write_suspects_csv(analysis.suspects, tmp_path / "s.csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(SUSPECT_COLUMNS)


def test_held_out_file_uses_the_runs_probabilities(noisy_run: dict, tmp_path: Path) -> None:
    rows, flipped = _flip(make_rows(60, seed=22), every=10, start=3)
    data = write_csv(tmp_path / "test.csv", rows)
    analysis = analyze(noisy_run["run"], data, AnalyzeOptions(explain=0))
    assert analysis.mode == "held_out" and analysis.folds is None
    found = {s.index for s in analysis.suspects}
    assert found and len(found & flipped) / len(found) >= 0.8
    # The flipped rows are the mistakes, and the pairs they make are the confused ones.
    assert {m.index for m in analysis.mistakes} >= found
    assert sum(pair.total for pair in analysis.pairs) == 60 - round(analysis.summary["accuracy"] * 60 / 100)


def test_mistakes_are_explained_when_the_explain_module_is_there(noisy_run: dict, tmp_path: Path) -> None:
    pytest.importorskip("tuneforge.explain", reason="tuneforge.explain is not in this checkout")
    rows, _ = _flip(make_rows(30, seed=23), every=6, start=0)
    data = write_csv(tmp_path / "test.csv", rows)
    analysis = analyze(noisy_run["run"], data, AnalyzeOptions(explain=2))
    assert analysis.mistakes
    for i, mistake in enumerate(analysis.mistakes):
        if i < 2:
            assert [word for word, _ in mistake.explanation] == mistake.text.split()
        else:
            assert mistake.explanation == []
    assert 'title="' in render_html(analysis)  # the words carry their scores


def test_small_label_lowers_the_folds_with_a_note(noisy_run: dict, tmp_path: Path) -> None:
    rows = [row for row in make_rows(60, seed=24) if row[1] != "meh"] + make_rows(9, seed=25)[2::3]
    assert sum(label == "meh" for _, label in rows) == 3
    data = write_csv(tmp_path / "small.csv", rows)
    analysis = analyze(noisy_run["run"], data, AnalyzeOptions(mode="training", explain=0))
    assert analysis.folds == 3
    assert any("3 folds, not 5" in note for note in analysis.notes)


# --- bad input ------------------------------------------------------------------------------------------
def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["analyze", *argv, "--no-progress"])
    return code, capsys.readouterr().err


def test_unknown_labels_are_named_with_their_counts(noisy_run: dict, tmp_path: Path, capsys) -> None:
    rows = [*make_rows(12, seed=3), ("great film", "joyful"), ("lovely", "joyful"), ("awful", "angry")]
    data = write_csv(tmp_path / "bad.csv", rows)
    out = tmp_path / "r.html"
    code, err = _run_cli(capsys, str(noisy_run["run"]), "--data", str(data), "--html", str(out))
    assert code == 2
    assert "3 rows have labels the run was not trained on: 'joyful' (2), 'angry' (1)" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("", (), "file is empty"),
        ("text,label\n", (), "has no data rows"),
        ("sentence,label\ngreat,happy\n", (), "text"),
        ("text,label\ngreat,happy\nawful,sad\nokay,meh\n", ("--training-data",), "single text"),
        ("text,label\ngreat,happy\n", ("--html", "report.pdf"), "not an .html file"),
        ("text,label\ngreat,happy\n", ("--suspects", "s.txt"), "not a .csv file"),
        ("text,label\ngreat,happy\n", ("--drop-suspects", "out.tsv"), ".csv or .jsonl"),
        ("text,label\ngreat,happy\n", ("--folds", "1"), "--folds: must be at least 2"),
        ("text,label\ngreat,happy\n", ("--explain", "-1"), "--explain"),
        ("text,label\ngreat,happy\n", ("--threads", "0"), "--threads: must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_line(
    noisy_run: dict, tmp_path: Path, capsys, content: str, extra: tuple[str, ...], message: str
) -> None:
    data = tmp_path / "data.csv"
    data.write_text(content, encoding="utf-8")
    extra = tuple(str(tmp_path / arg) if arg.endswith((".pdf", ".txt", ".tsv")) else arg for arg in extra)
    outputs = ("--html", str(tmp_path / "r.html"), "--suspects", str(tmp_path / "s.csv"))
    code, err = _run_cli(capsys, str(noisy_run["run"]), "--data", str(data), *outputs, *extra)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_drop_suspects_refuses_to_overwrite_its_source(noisy_run: dict, tmp_path: Path, capsys) -> None:
    data = write_csv(tmp_path / "d.csv", make_rows(30, seed=5))
    before = data.read_bytes()
    outputs = ("--html", str(tmp_path / "r.html"), "--suspects", str(tmp_path / "s.csv"))
    code, err = _run_cli(capsys, str(noisy_run["run"]), "--data", str(data), *outputs, "--drop-suspects", str(data))
    assert code == 2 and "would overwrite the data" in err
    assert data.read_bytes() == before


def test_parser_filters_match_the_finder() -> None:
    from tuneforge.apps.analyze import commands

    assert commands.FILTERS == FILTERS


def test_without_data_the_runs_training_file_is_analysed(noisy_run: dict, tmp_path: Path, capsys) -> None:
    html, suspects = tmp_path / "r.html", tmp_path / "s.csv"
    code = main(["analyze", str(noisy_run["run"]), "--html", str(html), "--suspects", str(suspects), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "(n=150, training data)" in captured.out
    assert re.search(r"probable label errors: \d+ of 150 rows", captured.out)
    assert html.is_file() and suspects.is_file()
