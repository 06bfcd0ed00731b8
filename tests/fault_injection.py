"""Test-only: run the tuneforge CLI in a subprocess, optionally killed (SIGKILL) right after an optimizer step.

``python tests/fault_injection.py STEP ARGS...`` runs ``tuneforge ARGS...`` with an ``on_step`` callback
passed to ``train()`` that SIGKILLs the process once optimizer step STEP is done: a crash at the worst
moment, with no chance to clean up, which the production loop knows nothing about.

Among several training processes (torchrun starts this script once per process) the environment picks
the fault: ``TUNEFORGE_FAULT_RANK`` (only the process of that RANK; default every one) and
``TUNEFORGE_FAULT_MODE``: ``kill`` (SIGKILL, the default), ``raise`` (an exception) or ``hang`` (the
process stops answering, as a deadlocked one would).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FAULT_RANK_ENV = "TUNEFORGE_FAULT_RANK"
FAULT_MODE_ENV = "TUNEFORGE_FAULT_MODE"


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``tuneforge ARGS`` in a fresh interpreter."""
    return _run([sys.executable, "-m", "tuneforge", *args], env)


def run_cli_killed_at(step: int, args: list[str]) -> subprocess.CompletedProcess:
    """``tuneforge ARGS`` (a ``train`` command), SIGKILLed right after optimizer step ``step``."""
    return _run([sys.executable, str(Path(__file__).resolve()), str(step), *args], None)


def torchrun_faulted_at(
    step: int, nproc: int, args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``tuneforge ARGS`` on ``nproc`` processes under torchrun, the fault (see the module docstring) at ``step``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return _run([*launcher, str(Path(__file__).resolve()), str(step), *args], env)


def _run(command: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def _main(argv: list[str]) -> int:
    from tuneforge import cli
    from tuneforge.train import loop
    from tuneforge.train.checkpoint import LoopState

    kill_at = int(argv[0])
    rank = os.environ.get("RANK", "0")
    faulty = os.environ.get(FAULT_RANK_ENV, rank) == rank
    mode = os.environ.get(FAULT_MODE_ENV, "kill")

    def on_step(state: LoopState) -> None:
        if state.step == kill_at and faulty:
            if mode == "raise":
                raise RuntimeError(f"injected fault at step {kill_at}")
            if mode == "hang":
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)

    # The CLI looks train() up in its module when the command runs: hand it one with the callback.
    loop.train = functools.partial(loop.train, on_step=on_step)
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
