"""The parts of lora, adalora, ia3 and prefix that are the same: wrapping, saving, loading and merging with peft.

Saved folders are peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``), so
``peft.PeftModel.from_pretrained`` can read them too; tuneforge itself reads them without peft's loader so
that nothing but safetensors is ever deserialised.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, PeftModelForSequenceClassification, PeftType
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from tuneforge.adapters.common import head_module_names
from tuneforge.errors import ConfigError, ModelError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_NAME = "default"


def wrap(
    model: PreTrainedModel,
    config: PeftConfig,
    model_cls: type[PeftModelForSequenceClassification] = PeftModelForSequenceClassification,
) -> PeftModelForSequenceClassification:
    """Add the adapter; the head trains in full and is saved with it (peft's ``modules_to_save``).

    Without ``modules_to_save`` a reloaded adapter meets a freshly initialised random head: the classic
    "my peft classifier predicts garbage after loading" bug.
    """
    config.modules_to_save = head_module_names(model)
    return model_cls(model, config, adapter_name=ADAPTER_NAME)


def is_peft_model(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def peft_type(model: PeftModel) -> PeftType:
    return model.peft_config[ADAPTER_NAME].peft_type


@contextlib.contextmanager
def _unpruned_adalora(model: PeftModel) -> Iterator[None]:
    """Save AdaLoRA at its full initial rank, so the file is exactly the model in memory.

    peft drops the ranks its last budget allocation pruned, but between two allocations the optimizer
    moves the pruned singular values off zero again, so a pruned file would differ from the model that
    was just evaluated. Pruned ranks are zeros in the final phase, so little is lost: r stays small.
    """
    config = model.peft_config[ADAPTER_NAME]
    if config.peft_type != PeftType.ADALORA:
        yield
        return
    saved, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = saved


def save(model: PeftModel, folder: Path) -> None:
    with _unpruned_adalora(model):
        model.save_pretrained(str(folder), safe_serialization=True)
    # peft also writes a hub model card; the folder should hold only what loading needs.
    (folder / "README.md").unlink(missing_ok=True)


def read_config(folder: Path) -> PeftConfig:
    if not (folder / CONFIG_FILE).is_file():
        raise ModelError(f"{folder}: no {CONFIG_FILE}; not a saved adapter")
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True
    return config


def load(
    model: PreTrainedModel,
    folder: Path,
    model_cls: type[PeftModelForSequenceClassification] = PeftModelForSequenceClassification,
) -> PeftModelForSequenceClassification:
    """Rebuild the adapter on ``model`` from ``folder`` (safetensors only) for inference."""
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise ModelError(f"{folder}: no {WEIGHTS_FILE} (tuneforge loads adapters only from safetensors)")
    config = read_config(folder)
    adapted = model_cls(model, config, adapter_name=ADAPTER_NAME)
    weights = load_file(str(weights_file))
    # What a save of this freshly built adapter would write is exactly the set of tensors it needs.
    expected = set(get_peft_model_state_dict(adapted, adapter_name=ADAPTER_NAME))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ModelError(f"{weights_file}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        set_peft_model_state_dict(adapted, weights, adapter_name=ADAPTER_NAME)
    except RuntimeError as exc:  # shape mismatch, e.g. a different base model
        raise ModelError(f"{weights_file}: does not fit the model: {str(exc).splitlines()[0]}") from None
    adapted.eval()
    return adapted


def merge(model: PeftModel) -> PreTrainedModel:
    """A plain transformers model with the adapter folded into its weights and the trained head in place.

    Works on a copy: merging rewrites the base weights, and the caller's model may still be training.
    """
    kind = peft_type(model)
    if kind not in (PeftType.LORA, PeftType.ADALORA, PeftType.IA3):
        raise ConfigError(f"finetune.merge: {kind.value.lower()} cannot be merged into the base model")
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    return merged
