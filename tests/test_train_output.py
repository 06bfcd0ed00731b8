"""Where a run is written: nothing but a run is ever replaced, an earlier run survives any failure of
the one replacing it, and --resume survives a torn log line."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_config, write_csv
from tests.fault_injection import run_cli, run_cli_killed_at
from tuneforge.config import validate_config
from tuneforge.errors import RunDirError, TuneforgeError
from tuneforge.train.checkpoint import LoopState
from tuneforge.train.loop import train


class Interrupted(Exception):
    """Stands in for a crash at a chosen optimizer step (in-process: faster than a killed subprocess)."""


def _interrupt_at(step: int):
    def on_step(state: LoopState) -> None:
        if state.step == step:
            raise Interrupted

    return on_step


def _hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture()
def earlier_run(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    train(validate_config(tiny_config(tiny_model_dir, tiny_data, out, epochs=1)), show_progress=False)
    return out


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
def test_a_folder_that_is_not_a_run_is_never_replaced(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, overwrite: bool
) -> None:
    # Not "pass --overwrite" either: no flag makes tuneforge delete a folder it did not write.
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    raw = tiny_config(tiny_model_dir, tiny_data, out, epochs=1)
    with pytest.raises(RunDirError, match=r"output\.dir: .*home is not empty and is not a tuneforge run directory"):
        train(validate_config(raw), overwrite=overwrite, show_progress=False)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "home.partial").exists()


def test_overwrite_with_bad_data_leaves_the_earlier_run_intact(
    earlier_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = _hashes(earlier_run)
    bad = {"train": write_csv(tmp_path / "bad.csv", [("a text", "pos")], header=("sentence", "label"))}
    with pytest.raises(TuneforgeError, match=r"bad\.csv"):
        train(validate_config(tiny_config(tiny_model_dir, bad, earlier_run)), overwrite=True, show_progress=False)
    assert _hashes(earlier_run) == before
    assert not earlier_run.with_name("run.partial").exists()


def test_overwrite_that_fails_mid_training_leaves_the_earlier_run_and_can_resume(
    earlier_run: Path, tiny_model_dir: Path, tiny_data: dict
) -> None:
    before = _hashes(earlier_run)
    config = validate_config(tiny_config(tiny_model_dir, tiny_data, earlier_run, epochs=2))
    with pytest.raises(Interrupted):
        train(config, overwrite=True, show_progress=False, on_step=_interrupt_at(6))
    assert _hashes(earlier_run) == before
    partial = earlier_run.with_name("run.partial")
    assert (partial / "checkpoints" / "last" / "state.json").is_file()

    # Starting again by accident must not throw the interrupted run away either.
    with pytest.raises(RunDirError, match=r"run\.partial holds an interrupted run .* --resume"):
        train(config, show_progress=False)

    result = train(config, resume=True, show_progress=False)
    assert result.run_dir == earlier_run
    assert not partial.exists()
    assert yaml.safe_load((earlier_run / "config.yaml").read_text())["train"]["epochs"] == 2
    assert json.loads((earlier_run / "metrics.json").read_text())["train"]["steps"] == 16
    for name in ("model/model.safetensors", "labels.json", "audit.json", "train_log.jsonl", "confusion_matrix.png"):
        assert (earlier_run / name).is_file(), name
    assert not (earlier_run / "checkpoints").exists()


def test_overwrite_killed_leaves_the_earlier_run_byte_for_byte(
    earlier_run: Path, tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    before = _hashes(earlier_run)
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tiny_data, earlier_run, epochs=2)))

    killed = run_cli_killed_at(5, ["train", str(path), "--overwrite", "--no-progress"])
    assert killed.returncode == -signal.SIGKILL
    assert _hashes(earlier_run) == before

    resumed = run_cli(["train", str(path), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert yaml.safe_load((earlier_run / "config.yaml").read_text())["train"]["epochs"] == 2
    assert not earlier_run.with_name("run.partial").exists()


def test_resume_without_an_interrupted_run_is_an_error(
    earlier_run: Path, tiny_model_dir: Path, tiny_data: dict
) -> None:
    before = _hashes(earlier_run)
    config = validate_config(tiny_config(tiny_model_dir, tiny_data, earlier_run, epochs=1))
    with pytest.raises(RunDirError, match=r"output\.dir: no interrupted run of .*run to resume"):
        train(config, resume=True, show_progress=False)
    assert _hashes(earlier_run) == before


def test_resume_survives_a_torn_last_log_line(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    # 8 steps per epoch, an evaluation and a checkpoint at the end of each: interrupted in epoch 2.
    config = validate_config(tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=2))
    with pytest.raises(Interrupted):
        train(config, show_progress=False, on_step=_interrupt_at(11))
    log = tmp_path / "run.partial" / "train_log.jsonl"
    # Disk full or power lost in the middle of an append: half a record, no newline, a split character.
    with log.open("ab") as handle:
        handle.write('{"step": 12, "eval": "accuracy", "note": "caf\u00e9'.encode()[:-1])

    train(config, resume=True, show_progress=False)
    lines = (tmp_path / "run" / "train_log.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "every record ends with a newline"
    records = [json.loads(line) for line in lines[:-1]]
    assert [r["step"] for r in records if "eval" in r] == [8, 16]


def test_the_loop_state_round_trips_through_the_checkpoint(tmp_path: Path) -> None:
    from tuneforge.train.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    state = LoopState(epoch=2, batch=5, step=21, samples=336, train_seconds=1.5, best=71.25, best_step=16, bad_evals=1)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, state)
    assert load_checkpoint(tmp_path / "ckpt", model, optimizer).loop_state == state

    # Another version's state (here: an extra key) is refused with a message, not a TypeError.
    saved = tmp_path / "ckpt" / "state.json"
    document = json.loads(saved.read_text())
    document["loop"]["history"] = []
    saved.write_text(json.dumps(document))
    with pytest.raises(RunDirError, match=r"state\.json: written by another version of tuneforge"):
        load_checkpoint(tmp_path / "ckpt", model, optimizer)
