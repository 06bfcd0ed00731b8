"""Run files on disk: what may be replaced (is_run_dir/check_replaceable, demo --out), permissions, fsync."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.errors import RunDirError
from tuneforge.files import aside_path, atomic_replace_dir, atomic_write_json, atomic_write_text, atomic_write_with
from tuneforge.rundir import check_replaceable, is_run_dir


def _fake_run(folder: Path, *markers: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text('["a", "b"]')
    for marker in markers:
        if "." in marker:
            (folder / marker).write_text("x")
        else:
            (folder / marker).mkdir()
    return folder


# --- what counts as a run, what may be replaced ------------------------------------------------------


@pytest.mark.parametrize("markers", [("config.yaml",), ("variant.json",), ("model",), ("adapter",), ("checkpoints",)])
def test_a_folder_with_labels_and_a_run_file_is_a_run(tmp_path: Path, markers: tuple[str, ...]) -> None:
    run = _fake_run(tmp_path / "run", *markers)
    assert is_run_dir(run)
    check_replaceable(run, option="--out")


def test_folders_that_are_not_runs(tmp_path: Path) -> None:
    labels_only = _fake_run(tmp_path / "labels-only")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.yaml").write_text("data: {}")
    link = tmp_path / "link"
    link.symlink_to(_fake_run(tmp_path / "real", "model"), target_is_directory=True)
    for folder in (labels_only, config_only, link, tmp_path / "missing", tmp_path / "real" / "labels.json"):
        assert not is_run_dir(folder), folder


def test_check_replaceable_allows_only_missing_empty_or_run_folders(tmp_path: Path) -> None:
    check_replaceable(tmp_path / "missing", option="--out")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", option="--out")

    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match=r"--out: .*home is not empty and is not a tuneforge run directory"):
        check_replaceable(home, option="--out")
    afile = tmp_path / "data.csv"
    afile.write_text("text,label\n")
    with pytest.raises(RunDirError, match=r"output\.dir: .*data\.csv exists and is not a folder"):
        check_replaceable(afile, option="output.dir")
    link = tmp_path / "link"
    link.symlink_to(_fake_run(tmp_path / "real", "model"), target_is_directory=True)
    with pytest.raises(RunDirError, match="is not a folder"):
        check_replaceable(link, option="--out")
    assert (home / "thesis.tex").read_text() == "years of work" and afile.is_file() and (tmp_path / "real").is_dir()


def test_demo_out_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    class Reached(Exception):
        pass

    def fake_train(config, **kwargs):  # the real one would fine-tune minilm-l6: minutes
        calls.append(config.output.dir)
        raise Reached

    monkeypatch.setattr("tuneforge.train.loop.train", fake_train)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["demo", "--out", str(home), "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and str(home) in err and "Traceback" not in err
    assert (home / "notes.txt").read_text() == "keep me" and calls == []

    # An earlier demo run is the demo's own: it goes on to replace it.
    earlier = _fake_run(tmp_path / "demo", "config.yaml", "model")
    with pytest.raises(Reached):
        main(["demo", "--out", str(earlier), "--no-progress"])
    assert calls == [earlier]


# --- permissions and fsync of atomic writes ----------------------------------------------------------


@pytest.fixture()
def umask_027() -> Iterator[int]:
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_folders_get_the_umask_permissions(tmp_path: Path, umask_027: int) -> None:
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    atomic_write_with(tmp_path / "c.bin", lambda tmp: tmp.write_bytes(b"x"))

    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"w")
        (folder / "sub").mkdir()
        atomic_write_text(folder / "sub" / "tokenizer.json", "{}")

    atomic_replace_dir(tmp_path / "model", write)
    for name in ("a.txt", "b.json", "c.bin", "model/weights.bin", "model/sub/tokenizer.json"):
        assert _mode(tmp_path / name) == 0o666 & ~umask_027, name
    for name in ("model", "model/sub"):
        assert _mode(tmp_path / name) == 0o777 & ~umask_027, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin", "model"]


def test_staged_files_are_flushed_before_the_folder_is_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model"
    atomic_replace_dir(target, lambda folder: (folder / "old.bin").write_bytes(b"old"))
    synced: list[str] = []
    swaps: list[tuple[str, str, set[str]]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst) -> None:
        swaps.append((str(src), str(dst), set(synced)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    staged: list[str] = []

    def write(folder: Path) -> None:
        (folder / "sub").mkdir()
        for name in ("config.json", "model.safetensors", "sub/vocab.txt"):
            (folder / name).write_bytes(b"new " + name.encode())
            staged.append(name)

    atomic_replace_dir(target, write)
    monkeypatch.undo()

    swap_in = [(src, synced_then) for src, dst, synced_then in swaps if dst == str(target)]
    assert len(swap_in) == 1, swaps
    staging, synced_then = swap_in[0]
    for name in staged:
        assert os.path.join(staging, name) in synced_then, f"{name} was not flushed before the swap"
    assert staging in synced_then and os.path.join(staging, "sub") in synced_then, "folders not flushed"
    assert (target / "sub" / "vocab.txt").read_bytes() == b"new sub/vocab.txt"
    assert not (target / "old.bin").exists() and not aside_path(target).exists()


def test_a_failed_swap_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model"
    atomic_replace_dir(target, lambda folder: (folder / "weights.bin").write_bytes(b"old"))
    real_replace = os.replace

    def replace(src, dst) -> None:
        if Path(dst) == target and Path(src).name.endswith(".tmp"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_replace_dir(target, lambda folder: (folder / "weights.bin").write_bytes(b"new"))
    monkeypatch.undo()
    assert (target / "weights.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_users_old_folder_beside_the_target_is_never_touched(tmp_path: Path) -> None:
    """The swap keeps the previous copy under a hidden name of its own, so `runs/x.old` is the user's."""
    target = tmp_path / "x"
    mine = tmp_path / "x.old"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    atomic_replace_dir(target, lambda folder: (folder / "a.bin").write_bytes(b"1"))
    atomic_replace_dir(target, lambda folder: (folder / "a.bin").write_bytes(b"2"))
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (target / "a.bin").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "x.old"]


def test_a_copy_left_aside_by_a_crash_is_cleared_by_the_next_swap(tmp_path: Path) -> None:
    target = tmp_path / "x"
    stale = aside_path(target)
    stale.mkdir()
    (stale / "a.bin").write_bytes(b"stale")
    atomic_replace_dir(target, lambda folder: (folder / "a.bin").write_bytes(b"new"))
    assert not stale.exists() and (target / "a.bin").read_bytes() == b"new"
