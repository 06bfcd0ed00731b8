"""Resume checkpoints as plain files: safetensors for tensors, JSON for everything else.

A checkpoint holds what a run needs to continue exactly where it stopped: weights, optimizer
moments, the RNG state of every training process (for dropout; the GPU's too on CUDA) and the loop
position. Weights and optimizer are the same on every process, so one copy serves them all. It is
written to a fresh folder and swapped in, so a SIGKILL during the write leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from tuneforge.errors import RunDirError
from tuneforge.files import aside_path, atomic_replace_dir

WEIGHTS = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
STATE = "state.json"
METHOD_PREFIX = "__method__."
AVERAGE_PREFIX = "__average__."
RNG_PREFIX = "__rng_"


@dataclass
class LoopState:
    """Where the training loop stands: all of it goes into the checkpoint, as JSON."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # micro-batches of the current epoch consumed
    step: int = 0  # optimizer steps taken
    samples: int = 0
    train_seconds: float = 0.0
    best: float | None = None  # best validation score so far, and the step it was reached at
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    done: bool = False  # stopped early

    @classmethod
    def from_json(cls, saved: Any) -> LoopState:
        """The state ``asdict`` wrote; ValueError for anything else (e.g. another version's checkpoint)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(saved, dict) or set(saved) != names:
            raise ValueError(f"expected the keys {sorted(names)}")
        return cls(**saved)


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            name = f"{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's random state: torch's CPU generator and, on a GPU, that device's."""
    states = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _rng_key(kind: str, rank: int) -> str:
    # Rank 0's key is the one single-process checkpoints have always had.
    return f"{RNG_PREFIX}{kind}__" + (f".{rank}" if rank else "")


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: LoopState,
    method_state: dict[str, torch.Tensor] | None = None,
    weight_average: dict[str, torch.Tensor] | None = None,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    """``method_state``: tensors a fine-tuning method keeps outside its weights (AdaLoRA's importance scores);
    ``weight_average``: the EMA of the trainable weights, when the run keeps one; ``rng_states``: each
    training process's :func:`rng_state`, by rank (default: this process's CPU generator)."""

    def write(staging: Path) -> None:
        save_model(model, str(staging / WEIGHTS))
        tensors, meta = _split_optimizer_state(optimizer.state_dict())
        for rank, states in enumerate(rng_states or [rng_state()]):
            tensors.update({_rng_key(kind, rank): state for kind, state in states.items()})
        tensors.update({METHOD_PREFIX + key: value.contiguous() for key, value in (method_state or {}).items()})
        tensors.update({AVERAGE_PREFIX + key: value.contiguous() for key, value in (weight_average or {}).items()})
        save_file(tensors, str(staging / OPTIMIZER_TENSORS))
        state = {"loop": asdict(loop_state), "optimizer": meta}
        (staging / STATE).write_text(json.dumps(state), encoding="utf-8")

    atomic_replace_dir(folder, write)


def has_checkpoint(folder: Path) -> bool:
    for candidate in (folder, aside_path(folder)):
        if (candidate / STATE).is_file():
            return True
    return False


@dataclass
class Checkpoint:
    loop_state: LoopState
    method_state: dict[str, torch.Tensor]
    weight_average: dict[str, torch.Tensor]
    processes: int  # how many training processes wrote their random state
    rng_restored: bool  # False: this process's rank had none (the run had fewer processes)


def _pop_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    rank: int = 0,
    device: torch.device | None = None,
) -> Checkpoint:
    """Restore weights, optimizer and the random state of process ``rank`` in place; return what else the
    run kept (see ``save_checkpoint``)."""
    if not (folder / STATE).is_file():
        # A crash between the two renames of atomic_replace_dir leaves the last good copy aside.
        folder = aside_path(folder)
    if not (folder / STATE).is_file():
        raise RunDirError(f"{folder.parent}: no checkpoint to resume from")
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    try:
        loop_state = LoopState.from_json(state.get("loop"))
    except ValueError:
        raise RunDirError(
            f"{folder / STATE}: written by another version of tuneforge; train again without --resume"
        ) from None
    load_model(model, str(folder / WEIGHTS), strict=True)
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    rngs = {RNG_PREFIX + key: value for key, value in _pop_prefixed(tensors, RNG_PREFIX).items()}
    method_state = _pop_prefixed(tensors, METHOD_PREFIX)
    weight_average = _pop_prefixed(tensors, AVERAGE_PREFIX)
    optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
    own = rngs.get(_rng_key("torch", rank))
    if own is not None:
        torch.set_rng_state(own)
        cuda = rngs.get(_rng_key("cuda", rank))
        if cuda is not None and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda, device)
    processes = sum(1 for key in rngs if key.startswith(_rng_key("torch", 0)))
    return Checkpoint(loop_state, method_state, weight_average, processes, own is not None)
