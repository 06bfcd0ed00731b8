"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, (IA)^3 and prefix tuning (via peft) and bottleneck adapters.

Training::

    check_target_modules(model, cfg.finetune)              # before anything touches the disk
    model = apply_method(model, cfg.finetune, total_steps=total_steps)
    ... loss = loss + (extra_loss(model) or 0); loss.backward(); optimizer.step()
    after_backward(model, step); optimizer.zero_grad()
    save_adapter(model, folder, base_model_name=cfg.model.name, labels=labels)

Inference: ``load_adapted_classifier(folder)``, ``merge_adapter(model)``, or ``AdapterBank`` for several
tasks on one base model. This package imports neither ``tuneforge.train`` nor ``tuneforge.models``
(``models`` loads an adapter run through it); pyproject.toml's import contracts check that.
"""

from tuneforge.adapters.bank import AdapterBank
from tuneforge.adapters.common import METADATA_FILE, freeze_lower_layers, trainable_parameter_count
from tuneforge.adapters.core import (
    METHODS,
    after_backward,
    apply_method,
    base_classifier,
    check_target_modules,
    extra_loss,
    head_parameter_names,
    load_adapted_classifier,
    load_training_state,
    merge_adapter,
    method_of,
    read_metadata,
    save_adapter,
    training_state,
)

__all__ = [
    "METADATA_FILE",
    "METHODS",
    "AdapterBank",
    "after_backward",
    "apply_method",
    "base_classifier",
    "check_target_modules",
    "extra_loss",
    "freeze_lower_layers",
    "head_parameter_names",
    "load_adapted_classifier",
    "load_training_state",
    "merge_adapter",
    "method_of",
    "read_metadata",
    "save_adapter",
    "trainable_parameter_count",
    "training_state",
]
