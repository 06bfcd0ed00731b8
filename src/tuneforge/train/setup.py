"""What learns and how: the model with its fine-tuning method applied, and its optimizer.

Shared by the training loop and the learning-rate range test, so the range test measures exactly the
set-up that training will use.
"""

from __future__ import annotations

import torch

from tuneforge import adapters
from tuneforge.config import RunConfig
from tuneforge.models.loading import load_base_for_classification
from tuneforge.train.optim import build_optimizer, parameter_groups


def trainable_model(
    cfg: RunConfig, labels: list[str], *, total_steps: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Load the base model with a fresh head for ``labels``, apply ``cfg.finetune`` and build the optimizer.

    ``total_steps`` is needed by methods with a schedule of their own (AdaLoRA's rank budget).
    """
    model, _ = load_base_for_classification(cfg.model, labels)
    adapters.check_target_modules(model, cfg.finetune)
    if cfg.finetune.method == "full" and cfg.finetune.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.finetune.method == "full" and cfg.finetune.freeze_layers:
        adapters.freeze_lower_layers(model, cfg.finetune.freeze_layers)
    model = adapters.apply_method(model, cfg.finetune, total_steps=total_steps)
    optimizer = build_optimizer(parameter_groups(model, cfg.train, adapters.head_parameter_names(model)), cfg.train)
    return model, optimizer
