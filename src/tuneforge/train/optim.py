"""Optimizers, their parameter groups, and the learning-rate (and momentum) schedules.

The loop calls, once::

    optimizer = build_optimizer(parameter_groups(model, cfg, head_names), cfg)

and before every optimizer step::

    apply_schedule(optimizer, step, total_steps=..., warmup_steps=..., schedule=cfg.schedule)

which sets each group's learning rate to ``initial_lr * lr_factor(...)`` and, for ``one_cycle``,
cycles the momentum (SGD's ``momentum``, AdamW's beta1) against the learning rate.
"""

from __future__ import annotations

import math

import torch

from tuneforge.config import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.pretrained import block_index

# Smith's one-cycle (Smith & Topin 2017, "Super-Convergence"), with PyTorch's / fastai's constants:
# the lr starts at max/25, and ends at max/(25 * 1e4), i.e. practically 0.
ONE_CYCLE_DIV_FACTOR = 25.0
ONE_CYCLE_FINAL_DIV_FACTOR = 1e4
# Momentum moves inversely to the lr: high while the lr is low, lowest at the lr's peak.
ONE_CYCLE_MAX_MOMENTUM = 0.95
ONE_CYCLE_BASE_MOMENTUM = 0.85


def layer_lr_factors(names: list[str], decay: float) -> dict[str, float]:
    """Layer-wise lr decay: each parameter's multiple of the body lr, by how deep in the network it sits.

    The top block (and whatever sits above it in the body, e.g. BERT's pooler) learns at the full rate;
    each block below learns ``decay`` times as fast as the one above, the embeddings one step further
    down (Howard & Ruder 2018; Clark et al. 2020). Lower layers hold the general language knowledge a
    small model cannot afford to forget; upper layers need to move most for the task.
    """
    if decay == 1.0:
        return dict.fromkeys(names, 1.0)
    blocks = {name: index for name in names if (index := block_index(name)) is not None}
    if not blocks:
        raise ConfigError(
            f"train.layer_lr_decay: {decay} needs numbered layers ('.layer.N.') in the model's parameter "
            "names and found none; set it to 1.0 for this model"
        )
    top = max(blocks.values())
    factors = {}
    for name in names:
        if name in blocks:
            depth = top - blocks[name]
        elif "embeddings" in name:
            depth = top + 1
        else:
            depth = 0
        factors[name] = decay**depth
    return factors


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig, head_parameters: set[str]) -> list[dict[str, object]]:
    """Optimizer groups: no weight decay on biases and LayerNorm (1-D tensors); the fresh head may use its own lr.

    Decaying LayerNorm gains towards zero or biases towards the origin only hurts; the usual BERT recipe
    exempts them. The head starts from random weights, so small encoders converge much faster when it
    learns faster than the pretrained body; the body's lr may also fall layer by layer towards the input
    (``cfg.layer_lr_decay``, see :func:`layer_lr_factors`). ``initial_lr`` is each group's peak lr,
    which the schedule scales.
    """
    head_lr = cfg.head_learning_rate or cfg.learning_rate
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    body_names = [name for name, _ in trainable if name not in head_parameters]
    factors = layer_lr_factors(body_names, cfg.layer_lr_decay)
    # Keyed (is_head, lr, decays): a stable group order (body before head) that checkpoints rely on.
    groups: dict[tuple[bool, float, bool], list[torch.nn.Parameter]] = {}
    for name, param in trainable:
        is_head = name in head_parameters
        lr = head_lr if is_head else cfg.learning_rate * factors[name]
        groups.setdefault((is_head, lr, param.ndim >= 2), []).append(param)
    return [
        {"params": params, "lr": lr, "initial_lr": lr, "weight_decay": cfg.weight_decay if decays else 0.0}
        for (_, lr, decays), params in sorted(groups.items())
    ]


def build_optimizer(groups: list[dict[str, object]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over ``groups`` (each keeps its own lr and weight decay).

    - ``adamw``: torch's fused AdamW, the same AdamW math several times faster on CPU (and what the HF
      Trainer uses). Weight decay is decoupled.
    - ``adafactor``: Shazeer & Stern 2018, factored second moments (a row and a column vector per matrix
      instead of a full matrix) and no first moment: much less optimizer memory. Built with
      ``relative_step=False, scale_parameter=False, warmup_init=False`` so that it uses the group's lr,
      which our schedule drives, as an absolute step size (updates are RMS-clipped to 1, so its lr sits in
      the same range as AdamW's). Weight decay is decoupled.
    - ``sgd``: SGD with Nesterov momentum ``cfg.momentum`` (plain momentum-free SGD when it is 0). Weight
      decay here is classic L2 (added to the gradient). SGD usually needs a much larger lr than AdamW
      (1e-2 and up): run ``tuneforge lr-find`` first.
    """
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=cfg.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def _cosine_between(start: float, end: float, progress: float) -> float:
    """Half a cosine from ``start`` (progress 0) to ``end`` (progress 1): flat at both ends."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _one_cycle_progress(step: int, total_steps: int, warmup_steps: int) -> tuple[bool, float]:
    """(rising?, progress within that phase in [0, 1]); the peak is at step ``warmup_steps``."""
    if step < warmup_steps:
        return True, step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return False, min(max(progress, 0.0), 1.0)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based, of ``total_steps``).

    ``linear``/``cosine``/``constant``: linear warm-up to 1 over the first ``warmup_steps`` steps, then
    linear or cosine decay to 0 (or none).

    ``one_cycle`` (Smith & Topin 2017): the lr rises along half a cosine from 1/25 of the peak at step 0
    to the peak at step ``warmup_steps`` (so the warm-up is the ``warmup_steps`` steps below the peak),
    then anneals along half a cosine to 1/(25 * 1e4) of the peak at the last step, ``total_steps - 1``.
    A cosine ramp (as PyTorch's OneCycleLR) lingers near the low and the high lr and changes fastest in
    between. ``warmup_ratio`` 0.3 is Smith's and PyTorch's usual split; 0 starts at the peak.
    """
    if schedule == "one_cycle":
        peak, start, end = 1.0, 1.0 / ONE_CYCLE_DIV_FACTOR, 1.0 / (ONE_CYCLE_DIV_FACTOR * ONE_CYCLE_FINAL_DIV_FACTOR)
        rising, progress = _one_cycle_progress(step, total_steps, warmup_steps)
        return _cosine_between(start, peak, progress) if rising else _cosine_between(peak, end, progress)
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


def one_cycle_momentum(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    max_momentum: float = ONE_CYCLE_MAX_MOMENTUM,
    base_momentum: float = ONE_CYCLE_BASE_MOMENTUM,
) -> float:
    """One-cycle momentum at ``step``: the mirror image of :func:`lr_factor`'s ``one_cycle`` curve.

    It falls from ``max_momentum`` to ``base_momentum`` while the lr rises, and climbs back while the lr
    anneals (Smith 2018): a high lr with high momentum would overshoot; when the lr is low, momentum
    keeps progress going.
    """
    rising, progress = _one_cycle_progress(step, total_steps, warmup_steps)
    if rising:
        return _cosine_between(max_momentum, base_momentum, progress)
    return _cosine_between(base_momentum, max_momentum, progress)


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its ``initial_lr`` (peak) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Set the momentum of every group: SGD's ``momentum``, AdamW's beta1, Adafactor's beta1.

    SGD built with momentum 0 gains momentum (torch creates the buffer on first use). Adafactor built
    with ``beta1=None`` (ours) has no first moment and no state slot for one, so it is left unchanged.
    """
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum
        elif group.get("beta1") is not None:
            group["beta1"] = momentum


def apply_schedule(
    optimizer: torch.optim.Optimizer, step: int, *, total_steps: int, warmup_steps: int, schedule: str
) -> float:
    """Set the lr (and, for ``one_cycle``, the momentum) for optimizer step ``step``; return the lr factor.

    Call it before every ``optimizer.step()``. It is a pure function of ``step``, so a resumed run gets
    exactly the values an uninterrupted one had.
    """
    factor = lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule)
    set_learning_rate(optimizer, factor)
    if schedule == "one_cycle":
        set_momentum(optimizer, one_cycle_momentum(step, total_steps=total_steps, warmup_steps=warmup_steps))
    return factor
