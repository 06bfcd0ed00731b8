"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from tuneforge.config import TrainConfig


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig, head_parameters: set[str]) -> list[dict[str, object]]:
    """AdamW groups: no weight decay on biases and LayerNorm (1-D tensors); the fresh head may use its own lr.

    Decaying LayerNorm gains towards zero or biases towards the origin only hurts; the usual BERT recipe
    exempts them. The head starts from random weights, so small encoders converge much faster when it
    learns faster than the pretrained body.
    """
    head_lr = cfg.head_learning_rate or cfg.learning_rate
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (name in head_parameters, param.ndim >= 2)
        groups.setdefault(key, []).append(param)
    result = []
    for (is_head, decays), params in sorted(groups.items()):
        result.append(
            {
                "params": params,
                "lr": head_lr if is_head else cfg.learning_rate,
                "initial_lr": head_lr if is_head else cfg.learning_rate,
                "weight_decay": cfg.weight_decay if decays else 0.0,
            }
        )
    return result


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): warm-up, then decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
