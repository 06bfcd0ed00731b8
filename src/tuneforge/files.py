"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it where the OS lets us (os.umask(x) sets it process-wide,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _usual_permissions(path: Path, *, folder: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 (private to this user); a run is meant to be shared like any
    file this process would create with open()/mkdir(), e.g. served by another account."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, children before parents."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_symlink():
                continue
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_with(path: Path | str, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` write a temporary file (e.g. a library's save call), then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _usual_permissions(Path(tmp), folder=False)
        writer(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def aside_path(path: Path | str) -> Path:
    """Where atomic_replace_dir keeps the previous copy of ``path`` during its swap.

    A hidden name of tuneforge's own, so that clearing a stale one can never delete a user's
    ``runs/x.old`` (or any other folder a person would name).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tuneforge-old")


def atomic_replace_dir(path: Path | str, writer: Callable[[Path], None]) -> None:
    """Write a whole folder next to ``path`` and swap it in, so readers never see it half-written.

    The swap is two renames (old aside, new in); a crash between them leaves the old copy at
    ``aside_path(path)``, which the next call cleans up, so the newest complete copy is always at one of
    the two. An error (not a crash) between them puts the old copy back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = aside_path(path)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _usual_permissions(staging, folder=True)
        writer(staging)
        # Renames are only atomic for data already on disk: flush the new tree before it is swapped in.
        _fsync_tree(staging)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not path.exists():  # failed between the two renames: put the old copy back
            os.replace(old, path)
        raise
    _fsync_dir(path.parent)


def cache_dir(name: str) -> Path:
    """A folder for what tuneforge can make again but would rather not: ``$TUNEFORGE_CACHE/<name>``, else
    ``~/.cache/tuneforge/<name>`` (converted models, paraphrases, a teacher's logits)."""
    base = os.environ.get("TUNEFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tuneforge")
    return Path(base) / name
