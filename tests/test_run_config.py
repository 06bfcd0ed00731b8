"""A run's saved config: one validated reader, paths that hold from any working directory, and
evaluate/optimize that work without the original training file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_rows, tiny_config, write_csv
from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.config import RunConfig, load_saved_config, validate_config
from tuneforge.errors import ConfigError, RunDirError
from tuneforge.optimize.pipeline import NEEDS_TRAINING_DATA, VARIANTS, OptimizeOptions, optimize_run
from tuneforge.rundir import RunDir

FAST = ["--threads", "1"]


@pytest.fixture()
def project_run(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run trained with ``tuneforge train project/config.yaml`` whose config names ``train.csv``
    relative to itself; the working directory is then moved elsewhere."""
    project = tmp_path / "project"
    project.mkdir()
    write_csv(project / "train.csv", make_rows(60, seed=3))
    raw = tiny_config(tiny_model_dir, {"train": project / "train.csv"}, Path("project/run"), epochs=1)
    raw["data"]["train"] = "train.csv"
    (project / "config.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "project/config.yaml", "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path / "project" / "run"


def _saved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))


def test_a_run_saves_absolute_data_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = validate_config({"data": {"train": "data/train.csv", "test": "test.csv"}, "distill": {"teacher": "t"}})
    assert config.data.train == Path("data/train.csv"), "a user's config keeps the path as written"
    saved = yaml.safe_load(config.to_yaml())
    assert saved["data"]["train"] == str(tmp_path / "data" / "train.csv")
    assert saved["data"]["test"] == str(tmp_path / "test.csv") and saved["data"]["validation"] is None
    assert saved["distill"]["teacher"] == str(tmp_path / "t")


def test_relative_paths_in_a_saved_config_resolve_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": "data/train.csv", "validation": "dev.csv"}}))
    # A same-named file in the working directory must not be picked up instead.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\n")
    (run / "data" / "train.csv").write_text("text,label\n")
    config = RunDir(Path("run")).config()
    assert isinstance(config, RunConfig)
    assert config.data.train == tmp_path / "run" / "data" / "train.csv"
    assert config.data.validation == tmp_path / "run" / "dev.csv", "a missing file is named where it should be"
    # A run saved before paths were absolute named them from the training's working directory.
    (run / "data" / "train.csv").unlink()
    assert RunDir(Path("run")).config().data.train == Path("data/train.csv")


def test_a_missing_or_invalid_run_config_is_a_run_dir_error_naming_the_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert run.config_or_none() is None
    with pytest.raises(RunDirError, match=r"run: no config\.yaml"):
        run.config()
    for text, problem in (
        ("data: {train: t.csv}\ntrain: {epochz: 3}\n", r"train\.epochz: unknown key \(allowed: epochs"),
        ("data: {train: t.csv}\nmodel: {max_length: 2}\n", r"model\.max_length: Input should be greater"),
        ("model: {name: x}\n", r"data: required key is missing"),
        ("data: [unclosed\n", "not valid YAML"),
        ("- a list\n", "must be a mapping"),
    ):
        run.config_file.write_text(text)
        for read in (run.config, run.config_or_none):
            with pytest.raises(RunDirError, match=problem) as caught:
                read()
            assert str(run.config_file) in str(caught.value)
    with pytest.raises(ConfigError, match=r"config\.yaml: config file not found"):
        load_saved_config(tmp_path / "config.yaml")


def test_evaluate_works_from_another_folder_without_the_training_file(
    project_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "project" / "train.csv").unlink()
    write_csv(Path("eval.csv"), make_rows(12, seed=11))
    assert main(["evaluate", str(project_run), "--data", "eval.csv", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    # A bad reading option is a one-line error naming the key, not a traceback.
    assert main(["evaluate", str(project_run), "--data", "eval.csv", "--encoding", "klingon"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: data: unknown encoding 'klingon'") and "Traceback" not in err
    # A run folder assembled by hand, without a config, is read with the default settings.
    (project_run / "config.yaml").unlink()
    assert main(["evaluate", str(project_run), "--data", "eval.csv", "--json"]) == 0


def test_optimize_from_another_folder_reads_the_training_texts(project_run: Path) -> None:
    out = Path("opt")
    result = optimize_run(project_run, out_dir=out, options=OptimizeOptions(variants=("onnx-int8-static",), threads=1))
    assert [m.name for m in result.measurements] == ["torch-fp32", "onnx-int8-static"]
    # The variants' configs name the same files, wherever they are read from.
    assert RunDir(out).config().data.train == RunDir(project_run).config().data.train


def test_optimize_with_data_and_without_the_training_file(
    project_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train_file = tmp_path / "project" / "train.csv"
    train_file.unlink()
    write_csv(Path("dev.csv"), make_rows(15, seed=12))

    # Asked for by name, a variant made from training texts is an error naming it and the file.
    capsys.readouterr()
    args = ["optimize", str(project_run), "--data", "dev.csv", "--out", "opt", *FAST]
    assert main([*args, "--variants", "onnx-fp32,distilled"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--variants: distilled need the run's training data" in err and str(train_file) in err
    assert not Path("opt").exists()

    # By default those variants are skipped with a message, and the others are built and measured on --data.
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipping onnx-int8-static, pruned" in err and str(train_file) in err
    report = json.loads(Path("opt/optimize_report.json").read_text())
    assert [m["name"] for m in report["measurements"]] == [v for v in VARIANTS if v not in NEEDS_TRAINING_DATA]
    assert report["skipped"] == list(NEEDS_TRAINING_DATA) and report["validation_examples"] == 15

    # Without --data there is nothing to measure on.
    with pytest.raises(RunDirError, match="no validation data to measure variants on"):
        optimize_run(project_run, out_dir=Path("opt2"), options=OptimizeOptions(variants=("onnx-fp32",)))
