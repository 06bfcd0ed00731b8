"""Optimizers, parameter groups and the lr / momentum schedules (no model needed)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from tuneforge.config import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.train.checkpoint import LoopState, load_checkpoint, save_checkpoint
from tuneforge.train.optim import (
    ONE_CYCLE_DIV_FACTOR,
    ONE_CYCLE_FINAL_DIV_FACTOR,
    apply_schedule,
    build_optimizer,
    lr_factor,
    one_cycle_momentum,
    parameter_groups,
)

OPTIMIZERS = ["adamw", "adafactor", "sgd"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Quadratic(torch.nn.Module):
    """``‖W x + b - y‖²`` plus a "head" matrix: 2-D weights decay, the 1-D bias does not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)
        self.x = torch.randn(8, 4)
        self.y = torch.randn(8, 2)

    def loss(self) -> torch.Tensor:
        return ((self.head(self.body(self.x)) - self.y) ** 2).mean()


def _cfg(optimizer: str, **kwargs: object) -> TrainConfig:
    return TrainConfig(optimizer=optimizer, learning_rate=1e-2, head_learning_rate=3e-2, weight_decay=0.1, **kwargs)


def _one_cycle(total: int, warmup: int) -> list[float]:
    return [lr_factor(s, total_steps=total, warmup_steps=warmup, schedule="one_cycle") for s in range(total)]


def test_one_cycle_rises_to_the_peak_at_the_end_of_warmup_then_anneals_to_zero() -> None:
    total, warmup = 100, 30
    curve = _one_cycle(total, warmup)
    assert curve[0] == pytest.approx(1 / ONE_CYCLE_DIV_FACTOR)
    assert max(curve) == 1.0 and curve.index(1.0) == warmup
    rising, falling = curve[: warmup + 1], curve[warmup:]
    assert all(a < b for a, b in itertools.pairwise(rising))
    assert all(a > b for a, b in itertools.pairwise(falling))
    assert curve[-1] == pytest.approx(1 / (ONE_CYCLE_DIV_FACTOR * ONE_CYCLE_FINAL_DIV_FACTOR))
    assert curve[-1] < 1e-5
    # Past the end (a step the loop never takes) it stays at the floor instead of cycling again.
    assert lr_factor(total + 5, total_steps=total, warmup_steps=warmup, schedule="one_cycle") == curve[-1]


def test_one_cycle_without_warmup_starts_at_the_peak() -> None:
    curve = _one_cycle(50, 0)
    assert curve[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(curve))


def test_one_cycle_momentum_moves_inversely_to_the_lr() -> None:
    total, warmup = 100, 30
    lrs = _one_cycle(total, warmup)
    moms = [one_cycle_momentum(s, total_steps=total, warmup_steps=warmup) for s in range(total)]
    assert moms[0] == pytest.approx(0.95) and moms[warmup] == pytest.approx(0.85) and moms[-1] == pytest.approx(0.95)
    assert min(moms) == moms[warmup]
    for s in range(1, total):
        assert (lrs[s] - lrs[s - 1]) * (moms[s] - moms[s - 1]) < 0, s


def test_the_other_schedules_are_unchanged() -> None:
    kw = {"total_steps": 100, "warmup_steps": 10}
    assert [lr_factor(s, schedule="linear", **kw) for s in (0, 9, 10, 55, 100)] == [0.1, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(10, schedule="cosine", **kw) == 1.0
    assert lr_factor(99, schedule="constant", **kw) == 1.0
    with pytest.raises(ValueError):
        lr_factor(50, schedule="triangular", **kw)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_keeps_the_groups_and_one_step_reduces_the_loss(name: str) -> None:
    model = Quadratic()
    cfg = _cfg(name)
    optimizer = build_optimizer(parameter_groups(model, cfg, {"head.weight", "head.bias"}), cfg)
    groups = {(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    # body bias, body weight, head bias, head weight: each lr with and without decay.
    assert groups == {(1e-2, 0.0, 1), (1e-2, 0.1, 1), (3e-2, 0.0, 1), (3e-2, 0.1, 1)}
    assert all(g["initial_lr"] == g["lr"] for g in optimizer.param_groups)

    before = model.loss()
    before.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert model.loss().item() < before.item()


def test_optimizer_specifics() -> None:
    model = Quadratic()
    adamw = build_optimizer(parameter_groups(model, _cfg("adamw"), set()), _cfg("adamw"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is True
    sgd = build_optimizer(parameter_groups(model, _cfg("sgd", momentum=0.8), set()), _cfg("sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    plain = build_optimizer(parameter_groups(model, _cfg("sgd", momentum=0.0), set()), _cfg("sgd", momentum=0.0))
    assert plain.defaults["nesterov"] is False
    adafactor = build_optimizer(parameter_groups(model, _cfg("adafactor"), set()), _cfg("adafactor"))
    assert adafactor.defaults["relative_step"] is False and adafactor.defaults["scale_parameter"] is False
    assert adafactor.defaults["warmup_init"] is False
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([], _cfg("adamw"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_apply_schedule_sets_lr_and_cycles_momentum(name: str) -> None:
    model = Quadratic()
    cfg = _cfg(name, schedule="one_cycle", warmup_ratio=0.3)
    optimizer = build_optimizer(parameter_groups(model, cfg, {"head.weight", "head.bias"}), cfg)
    for step in range(10):
        factor = apply_schedule(optimizer, step, total_steps=10, warmup_steps=3, schedule="one_cycle")
        assert factor == lr_factor(step, total_steps=10, warmup_steps=3, schedule="one_cycle")
        momentum = one_cycle_momentum(step, total_steps=10, warmup_steps=3)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(group["initial_lr"] * factor)
            if name == "adamw":
                assert group["betas"] == (momentum, 0.999)
            elif name == "sgd":
                assert group["momentum"] == momentum
            else:
                assert group["beta1"] is None  # Adafactor without a first moment: nothing to cycle
        model.loss().backward()
        optimizer.step()
        optimizer.zero_grad()
    # Other schedules leave the momentum alone.
    fresh = build_optimizer(parameter_groups(model, _cfg(name), set()), _cfg(name))
    apply_schedule(fresh, 0, total_steps=10, warmup_steps=3, schedule="linear")
    assert fresh.param_groups[0].get("betas", (0.9, 0.999))[0] == 0.9
    assert fresh.param_groups[0].get("momentum", 0.9) == 0.9


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoints_round_trip_every_optimizer(name: str, tmp_path: Path) -> None:
    """The loop's checkpoint format (safetensors + JSON) must hold each optimizer's state for --resume."""
    cfg = _cfg(name, schedule="one_cycle")

    def build() -> tuple[Quadratic, torch.optim.Optimizer]:
        model = Quadratic()
        return model, build_optimizer(parameter_groups(model, cfg, {"head.weight"}), cfg)

    def train_steps(model: Quadratic, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            apply_schedule(optimizer, step, total_steps=6, warmup_steps=2, schedule="one_cycle")
            model.loss().backward()
            optimizer.step()
            optimizer.zero_grad()

    straight, straight_opt = build()
    train_steps(straight, straight_opt, range(6))

    first, first_opt = build()
    train_steps(first, first_opt, range(3))
    save_checkpoint(tmp_path / "ckpt", first, first_opt, LoopState(step=3))
    resumed, resumed_opt = build()
    assert load_checkpoint(tmp_path / "ckpt", resumed, resumed_opt).loop_state == LoopState(step=3)
    train_steps(resumed, resumed_opt, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert math.isfinite(resumed.loss().item())


class TinyEncoder(torch.nn.Module):
    """Parameter names shaped like BERT's: embeddings, numbered blocks, a pooler, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = torch.nn.Embedding(10, 4)
        self.layer = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.pooler = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)


def test_layer_lr_decay_slows_each_layer_below_the_top() -> None:
    cfg = TrainConfig(learning_rate=1e-3, head_learning_rate=1e-2, weight_decay=0.1, layer_lr_decay=0.5)
    model = TinyEncoder()
    groups = parameter_groups(model, cfg, {"classifier.weight", "classifier.bias"})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert lr_of[id(names["classifier.weight"])] == 1e-2
    assert lr_of[id(names["pooler.weight"])] == 1e-3
    assert [lr_of[id(names[f"layer.{i}.weight"])] for i in range(3)] == pytest.approx([2.5e-4, 5e-4, 1e-3])
    assert lr_of[id(names["layer.0.bias"])] == lr_of[id(names["layer.0.weight"])]
    assert lr_of[id(names["embeddings.weight"])] == pytest.approx(1.25e-4)
    assert all(g["initial_lr"] == g["lr"] for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(names)
    # Biases and LayerNorms still skip weight decay, whatever their depth.
    assert {g["weight_decay"] for g in groups if all(p.ndim == 1 for p in g["params"])} == {0.0}

    flat = parameter_groups(model, cfg.model_copy(update={"layer_lr_decay": 1.0}), set())
    assert {g["lr"] for g in flat} == {1e-3}


def test_layer_lr_decay_needs_numbered_layers() -> None:
    cfg = TrainConfig(learning_rate=1e-3, layer_lr_decay=0.8)
    with pytest.raises(ConfigError, match=r"train\.layer_lr_decay"):
        parameter_groups(Quadratic(), cfg, set())
