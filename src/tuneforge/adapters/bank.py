"""Several adapters, one base model: serve many classification tasks from a single copy of the encoder.

Each task gets its own module tree whose frozen base parameters are the *same tensors* as the bank's
base model (a deep copy that shares every parameter and buffer), plus its own adapter and its own head
of its own size. Switching tasks is a dictionary lookup: nothing is copied, merged or swapped in place,
and a task gives exactly the logits its adapter gives when loaded alone.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from tuneforge.adapters.common import head_module_names
from tuneforge.adapters.core import attach_adapter, load_base, read_metadata
from tuneforge.errors import ModelError
from tuneforge.pretrained import resolve_model


def _share_body(base: PreTrainedModel, metadata: dict[str, Any]) -> PreTrainedModel:
    """A copy of ``base`` whose body tensors are ``base``'s own, with an empty head for the adapter's labels."""
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    model = copy.deepcopy(base, memo=shared)
    labels = list(metadata["labels"])
    model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    if hasattr(model, "num_labels"):
        model.num_labels = len(labels)
    # Build the head for this label count without allocating a second body: on the meta device, then
    # real (zeroed) memory for the head alone. The adapter's saved head overwrites it.
    with torch.device("meta"):
        skeleton = type(base)(model.config)
    device = next(base.parameters()).device
    for name in head_module_names(base):
        head = getattr(skeleton, name).to_empty(device=device)
        for tensor in itertools.chain(head.parameters(), head.buffers()):
            torch.nn.init.zeros_(tensor)
        setattr(model, name, head)
    return model


class AdapterBank:
    """One base model in memory, any number of saved adapters (each with its own head) on top of it.

    >>> bank = AdapterBank({"intent": "runs/intent/model", "sentiment": "runs/sentiment/model"})
    >>> bank.logits("sentiment", input_ids, attention_mask)
    """

    def __init__(self, adapters: Mapping[str, Path | str], base_source: str | Path | None = None) -> None:
        if not adapters:
            raise ValueError("AdapterBank needs at least one adapter folder")
        metadata = {task: read_metadata(folder) for task, folder in adapters.items()}
        if base_source is None:
            names = {meta["base_model"] for meta in metadata.values()}
            if len(names) > 1:
                raise ModelError(f"the adapters were trained on different base models ({', '.join(sorted(names))})")
            base_source = names.pop()
        first = next(iter(metadata.values()))
        self.base = load_base(resolve_model(str(base_source), trust_pickle=False), first)
        self.base.requires_grad_(False)
        self.base.eval()
        self._tasks: dict[str, torch.nn.Module] = {}
        self._labels: dict[str, list[str]] = {}
        for task, folder in adapters.items():
            self.add(task, folder, metadata[task])

    def add(self, task: str, adapter_dir: Path | str, metadata: dict[str, Any] | None = None) -> None:
        """Load another adapter onto the shared base."""
        if task in self._tasks:
            raise ValueError(f"task {task!r} is already loaded")
        adapter_dir = Path(adapter_dir)
        metadata = metadata or read_metadata(adapter_dir)
        self._tasks[task] = attach_adapter(_share_body(self.base, metadata), adapter_dir, metadata)
        self._labels[task] = list(metadata["labels"])

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def labels(self, task: str) -> list[str]:
        return self._labels[self._check(task)]

    def model(self, task: str) -> torch.nn.Module:
        """The task's eval-mode classifier (its forward returns ``.logits``), e.g. for ``predict_logits``."""
        return self._tasks[self._check(task)]

    @torch.inference_mode()
    def logits(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(task)(input_ids=input_ids, attention_mask=attention_mask).logits

    def _check(self, task: str) -> str:
        if task not in self._tasks:
            raise KeyError(f"no adapter loaded for task {task!r} (loaded: {', '.join(self._tasks)})")
        return task
