"""Bad input: a one-line error naming the file/row/key, a non-zero exit, and earlier runs untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_rows, tiny_config, write_csv
from tuneforge.cli import EXIT_BAD_INPUT, main


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def earlier_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("earlier")
    data = {"train": write_csv(folder / "train.csv", make_rows(60, seed=3))}
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, data, folder / "run", epochs=1)))
    assert main(["train", str(config), "--no-progress"]) == 0
    return folder / "run"


def _train_expecting_error(
    capsys: pytest.CaptureFixture, raw: dict, tmp_path: Path, earlier_run: Path, *extra: str
) -> str:
    before = _fingerprint(earlier_run)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    code = main(["train", str(config), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT
    assert _fingerprint(earlier_run) == before, "the earlier run directory was changed"
    message = [line for line in err if line.startswith("error: ")]
    assert len(message) == 1, err
    assert not any("Traceback" in line for line in err)
    return message[0]


def _bad_train_config(tiny_model_dir: Path, train_file: Path, earlier_run: Path, **model: object) -> dict:
    raw = tiny_config(tiny_model_dir, {"train": train_file}, earlier_run, epochs=1)
    raw["model"].update(model)
    return raw


def test_missing_column(capsys, tiny_model_dir, tmp_path, earlier_run) -> None:
    bad = write_csv(tmp_path / "reviews.csv", make_rows(20, seed=4), header=("text", "sentiment"))
    raw = _bad_train_config(tiny_model_dir, bad, earlier_run)
    message = _train_expecting_error(capsys, raw, tmp_path, earlier_run, "--overwrite")
    assert "reviews.csv" in message and "'label'" in message and "sentiment" in message


def test_empty_file(capsys, tiny_model_dir, tmp_path, earlier_run) -> None:
    bad = tmp_path / "empty.csv"
    bad.write_bytes(b"")
    message = _train_expecting_error(
        capsys, _bad_train_config(tiny_model_dir, bad, earlier_run), tmp_path, earlier_run, "--overwrite"
    )
    assert "empty.csv" in message and "empty" in message.split("empty.csv", 1)[1]


def test_single_class(capsys, tiny_model_dir, tmp_path, earlier_run) -> None:
    bad = write_csv(tmp_path / "one.csv", make_rows(20, seed=5, labels=("happy",)))
    message = _train_expecting_error(
        capsys, _bad_train_config(tiny_model_dir, bad, earlier_run), tmp_path, earlier_run, "--overwrite"
    )
    assert "one.csv" in message and "one class" in message and "happy" in message


def test_undecodable_bytes(capsys, tiny_model_dir, tmp_path, earlier_run) -> None:
    bad = tmp_path / "latin.csv"
    rows = "text,label\n" + "".join(f"{t},{y}\n" for t, y in make_rows(10, seed=6))
    bad.write_bytes(rows.encode() + "caf\u00e9 was superb,happy\n".encode("latin-1"))
    message = _train_expecting_error(
        capsys, _bad_train_config(tiny_model_dir, bad, earlier_run), tmp_path, earlier_run, "--overwrite"
    )
    assert "latin.csv" in message and "line 12" in message and "encoding" in message


def test_max_length_above_the_model_limit(capsys, tiny_model_dir, tmp_path, earlier_run) -> None:
    good = write_csv(tmp_path / "train.csv", make_rows(30, seed=7))
    raw = _bad_train_config(tiny_model_dir, good, earlier_run, max_length=100)
    message = _train_expecting_error(capsys, raw, tmp_path, earlier_run, "--overwrite")
    assert "model.max_length" in message and "64" in message


def test_existing_run_directory_needs_overwrite(capsys, tiny_model_dir, tmp_path, earlier_run) -> None:
    good = write_csv(tmp_path / "train.csv", make_rows(30, seed=8))
    message = _train_expecting_error(
        capsys, _bad_train_config(tiny_model_dir, good, earlier_run), tmp_path, earlier_run
    )
    assert str(earlier_run) in message and "--overwrite" in message


def test_unknown_config_key_names_the_key(capsys, tiny_model_dir, tmp_path, earlier_run) -> None:
    good = write_csv(tmp_path / "train.csv", make_rows(30, seed=9))
    raw = _bad_train_config(tiny_model_dir, good, earlier_run)
    raw["train"]["learning_rat"] = 0.1
    message = _train_expecting_error(capsys, raw, tmp_path, earlier_run, "--overwrite")
    assert "train.learning_rat: unknown key" in message and "learning_rate" in message


def test_unknown_label_in_evaluation_data(capsys, tmp_path, earlier_run) -> None:
    before = _fingerprint(earlier_run)
    rows = [*make_rows(6, seed=10), ("the plot was fine", "angry")]
    bad = write_csv(tmp_path / "eval.csv", rows)
    capsys.readouterr()
    assert main(["evaluate", str(earlier_run), "--data", str(bad)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "eval.csv" in err and "row 7" in err and "'angry'" in err
    assert _fingerprint(earlier_run) == before


def test_evaluate_and_predict_on_a_run(capsys, tmp_path, earlier_run) -> None:
    data = write_csv(tmp_path / "eval.csv", make_rows(12, seed=11))
    capsys.readouterr()
    assert main(["evaluate", str(earlier_run), "--data", str(data), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"accuracy"' in out and (earlier_run / "evaluations" / "eval.json").is_file()
    assert (earlier_run / "evaluations" / "eval.png").is_file()

    assert main(["predict", str(earlier_run), "the film was superb", "so boring", "--json", "--top-k", "2"]) == 0
    import json

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["the film was superb", "so boring"]
    for item in lines:
        assert item["label"] in {"happy", "sad", "meh"}
        assert len(item["top_k"]) == 2 and item["top_k"][0]["probability"] >= item["top_k"][1]["probability"]
        assert item["top_k"][0]["label"] == item["label"]

    texts = tmp_path / "texts.txt"
    texts.write_text("a lovely story\n\nterrible acting\n")
    assert main(["predict", str(earlier_run), "--file", str(texts)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and rows[0].endswith("\ta lovely story")
