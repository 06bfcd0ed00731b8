"""Training on several processes (data parallelism): who this process is, what it shares, how all fail together.

A launcher (``torchrun``, ``accelerate launch``, or ``tuneforge train --nproc N``, which runs torchrun's
agent) starts one process per CPU share or GPU and tells each its place in the environment: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``. Without them this is
the only process and every helper here is a no-op, so the single-process run is unchanged bit for bit.

Process groups: gloo on the CPU, NCCL on GPUs (plus a small gloo group for the Python objects and flags
this module passes around, which NCCL cannot carry on the CPU).

Failing together. A process that raises posts ``rank R: <error>`` in the group's key-value store before
it exits; the others then fail in their next collective (gloo: "connection closed by peer", within a
second) and report that message instead of their own communication error. Nothing waits forever: every
collective gives up after ``TUNEFORGE_DIST_TIMEOUT`` seconds (default 1800: long enough for rank 0 alone
to make a large augmentation while the others wait; a process that is alive but stuck is found then).
Under torchrun the agent also stops the others (SIGTERM) as soon as one process exits with an error.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tuneforge.errors import ConfigError, TuneforgeError

TIMEOUT_ENV = "TUNEFORGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
_FAILURE_KEY = "tuneforge/failure"
# How long a failing process waits for the key-value store (it may be gone with the process that hosted it).
_STORE_TIMEOUT = timedelta(seconds=5)
# Set on an exception that every process raises alike (on_main), so that none reports it as another's failure.
_SHARED = "_tuneforge_raised_everywhere"

T = TypeVar("T")


class DistributedError(TuneforgeError):
    """Another training process failed, or could not be reached: this one stops too."""


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes; ``Dist()`` is a run on one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The group for Python objects and flags (gloo); None: the default group (gloo already, on the CPU).
    objects_group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, checkpoints and logs, and shows the progress."""
        return self.rank == 0

    def default_threads(self) -> int:
        """The machine's cores shared out among the processes on it."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer in the environment, got {value!r}") from None


def place_from_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as the launcher set them; (0, 1, 0, 1) without one."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(1, local_world):
        raise ConfigError(
            f"RANK/WORLD_SIZE/LOCAL_RANK: inconsistent launcher environment "
            f"(RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world})"
        )
    return rank, world, local_rank, max(1, local_world)


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``train.device``: cpu, cuda (this process's GPU: ``LOCAL_RANK``) or auto (cuda when torch sees one)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: must be auto, cpu or cuda, not {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise ConfigError(
                "train.device: cuda was asked for, but torch sees no GPU (torch.cuda.is_available() is False: "
                f"a CPU-only torch {torch.__version__}, or no driver); use auto or cpu"
            )
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"train.device: this process is LOCAL_RANK {local_rank}, but only {count} GPU(s) are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}: expected seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}: must be > 0 seconds, got {raw!r}")
    return value


@contextmanager
def session(requested_device: str) -> Iterator[Dist]:
    """This process's :class:`Dist` for the block, with its process group when launched as one of several.

    An exception in the block is shared (see the module docstring): a process that raised posts its error;
    one whose communication broke because another failed raises :class:`DistributedError` with that one's
    message. A group this function created is closed when the block ends normally.
    """
    rank, world, local_rank, local_world = place_from_env()
    device = resolve_device(requested_device, local_rank)
    if world == 1:
        yield Dist(device=device)
        return
    created = not dist.is_initialized()
    if created:
        timeout = timedelta(seconds=timeout_seconds())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    objects_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    here = Dist(rank, world, local_rank, local_world, device, objects_group)
    try:
        yield here
    except BaseException as exc:
        _share_failure(here, exc)
        raise  # a process that failed on its own; the group dies with the process (closing it could block)
    if created:
        gc.collect()  # what still holds the group (DistributedDataParallel in a cycle) goes first: see Engine.close
        dist.destroy_process_group()


def _share_failure(here: Dist, exc: BaseException) -> None:
    """Post this process's error, or, when another process failed first, raise with its message instead.

    A broken collective is the symptom, not the cause: it is never posted, and becomes either the message
    another process posted or, when none did (killed, or the store went with rank 0), "lost contact"."""
    if getattr(exc, _SHARED, False):
        return  # raised by on_main on every process alike: each reports it as it is
    store = _failure_store()
    posted: str | None = None
    try:
        if is_communication_error(exc):
            posted = (
                store.get(_FAILURE_KEY).decode("utf-8", "replace") if store and store.check([_FAILURE_KEY]) else None
            )
        elif store is not None:
            # The first failure wins: a process that fails because another did must not overwrite its cause.
            mine = f"rank {here.rank}: {_describe(exc)}"
            posted = store.compare_set(_FAILURE_KEY, "", mine).decode("utf-8", "replace")
            posted = None if posted == mine else posted
    except (RuntimeError, OSError):
        posted = None  # the store lived in a process that is gone (rank 0, without torchrun's agent)
    if posted:
        raise DistributedError(f"stopped because another training process failed: {posted}") from exc
    if is_communication_error(exc):
        raise DistributedError(
            f"rank {here.rank}: lost contact with the other training processes ({_gist(exc)}); one of them "
            "ended without a message (killed, out of memory) or hangs, or the network failed: see their output"
        ) from exc


def _failure_store() -> Any:
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(_STORE_TIMEOUT)
        return store
    except (RuntimeError, ValueError, AttributeError):
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TuneforgeError):
        return _first_line(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _gist(exc: BaseException) -> str:
    """gloo's "[file.cc:537] Read error [addr]: Connection reset by peer. This is typically..." → the middle."""
    line = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(exc))
    return line.split(". This is typically")[0].rstrip(".")


def is_communication_error(exc: BaseException) -> bool:
    """A collective that failed because a peer went away or timed out (gloo reports these as RuntimeError)."""
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(sign in text for sign in ("gloo", "nccl", "connection closed", "connection reset", "timed out"))


# --------------------------------------------------------------------------- sharing values


def shard(items: list[T], here: Dist) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th from ``rank`` on (balanced in count and,
    for a length-sorted batch, in length)."""
    return items[here.rank :: here.world_size] if here.enabled else items


def unshard(mine: list[T], here: Dist) -> list[T]:
    """Every process's ``shard`` put back in the original order, on every process."""
    if not here.enabled:
        return mine
    parts: list[list[T]] = [[] for _ in range(here.world_size)]
    dist.all_gather_object(parts, mine, group=here.objects_group)
    total = sum(len(part) for part in parts)
    merged: list[Any] = [None] * total
    for rank, part in enumerate(parts):
        merged[rank :: here.world_size] = part
    return merged


def sum_across(value: float, here: Dist) -> float:
    if not here.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, group=here.objects_group)
    return float(tensor.item())


def sum_tensor(tensor: torch.Tensor, here: Dist) -> torch.Tensor:
    """The element-wise sum of a CPU tensor over the processes (each holds its rows, zeros elsewhere)."""
    if not here.enabled:
        return tensor
    summed = tensor.contiguous().clone()
    dist.all_reduce(summed, group=here.objects_group)
    return summed


def gather_objects(value: T, here: Dist) -> list[T]:
    """``value`` of every process, by rank, on every process."""
    if not here.enabled:
        return [value]
    parts: list[Any] = [None] * here.world_size
    dist.all_gather_object(parts, value, group=here.objects_group)
    return parts


def on_main(here: Dist, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and hand its result to every process; if it raises, every process raises.

    For what only one process must do (check or write the run directory, make augmented copies) while
    the others wait. A :class:`TuneforgeError` reaches the others as the same type and message (so the
    command line prints the same ``error:`` line everywhere); anything else as a :class:`DistributedError`.
    """
    if not here.enabled:
        return work()
    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if here.is_main:
        try:
            outcome[0] = ("ok", work())
        except Exception as exc:  # handed to every process, then raised here unchanged
            failure = exc
            kind = type(exc) if isinstance(exc, TuneforgeError) else None
            outcome[0] = ("error", kind, f"rank 0: {_describe(exc)}" if kind is None else str(exc))
    dist.broadcast_object_list(outcome, src=0, group=here.objects_group)
    if failure is not None:
        setattr(failure, _SHARED, True)
        raise failure
    if outcome[0][0] == "error":
        _, kind, message = outcome[0]
        error = (kind or DistributedError)(message)
        setattr(error, _SHARED, True)
        raise error
    return outcome[0][1]


# --------------------------------------------------------------------------- launching


def launch(module_args: list[str], nproc: int) -> int:
    """``python -m tuneforge MODULE_ARGS`` on ``nproc`` local processes under torchrun's agent (the same as
    ``torchrun --standalone --nproc-per-node NPROC -m tuneforge ...``); the exit code of the first to fail.

    Each process gets the machine's cores divided among them (``OMP_NUM_THREADS``) unless that is set. The
    agent stops all processes when one fails; its traceback is replaced by one line naming that process.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ConfigError(f"--nproc: must be at least 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "tuneforge", *module_args])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
        print(f"error: training process {rank} of {nproc} failed ({how}); its message is above", file=sys.stderr)
        return code
    return 0
