"""Test-only: run the tuneforge CLI in a subprocess, optionally killed (SIGKILL) right after an optimizer step.

``python tests/fault_injection.py STEP ARGS...`` runs ``tuneforge ARGS...`` with an ``on_step`` callback
passed to ``train()`` that SIGKILLs the process once optimizer step STEP is done: a crash at the worst
moment, with no chance to clean up, which the production loop knows nothing about.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``tuneforge ARGS`` in a fresh interpreter."""
    return _run([sys.executable, "-m", "tuneforge", *args], env)


def run_cli_killed_at(step: int, args: list[str]) -> subprocess.CompletedProcess:
    """``tuneforge ARGS`` (a ``train`` command), SIGKILLed right after optimizer step ``step``."""
    return _run([sys.executable, str(Path(__file__).resolve()), str(step), *args], None)


def _run(command: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def _main(argv: list[str]) -> int:
    from tuneforge import cli
    from tuneforge.train import loop
    from tuneforge.train.checkpoint import LoopState

    kill_at = int(argv[0])

    def on_step(state: LoopState) -> None:
        if state.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    # The CLI looks train() up in its module when the command runs: hand it one with the callback.
    loop.train = functools.partial(loop.train, on_step=on_step)
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
