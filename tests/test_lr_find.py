"""The learning-rate range test: its pure pieces, and a short run on the tiny model."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError
from tuneforge.train.lr_find import geometric_lrs, lr_range_test, smooth_losses, suggest_learning_rate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_geometric_lrs_span_the_range_with_a_constant_ratio() -> None:
    lrs = geometric_lrs(1e-7, 1.0, 50)
    assert len(lrs) == 50 and lrs[0] == 1e-7 and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert all(r > 1 for r in ratios)
    assert max(ratios) == pytest.approx(min(ratios))
    for bad in ((1e-3, 1e-3, 10), (0.0, 1.0, 10), (1e-3, 1.0, 1)):
        with pytest.raises(ConfigError):
            geometric_lrs(*bad)


def test_smoothing_is_bias_corrected() -> None:
    assert smooth_losses([2.0] * 5) == pytest.approx([2.0] * 5)
    smoothed = smooth_losses([1.0, 3.0, 1.0, 3.0, 1.0, 3.0], beta=0.9)
    assert smoothed[0] == 1.0 and max(smoothed) < 3.0


def _synthetic_curve() -> tuple[list[float], list[float]]:
    """Flat up to 1e-5, falling to a minimum at 1e-2, then blowing up, with small deterministic wiggles."""
    lrs = geometric_lrs(1e-7, 1.0, 71)  # 10 points per decade: lrs[50] == 1e-2
    losses = []
    for i, lr in enumerate(lrs):
        x = math.log10(lr)
        if x <= -5:
            loss = 2.0
        elif x <= -2:
            loss = 2.0 - 1.5 * (x + 5) / 3
        else:
            loss = 0.5 + 4.0 * (x + 2) ** 2
        losses.append(loss + 0.01 * math.sin(7 * i))
    return lrs, losses


def test_the_suggestion_is_a_tenth_of_the_min_loss_lr() -> None:
    lrs, losses = _synthetic_curve()
    assert suggest_learning_rate(lrs, losses) == pytest.approx(1e-3, rel=1e-6)
    # Non-finite points (a blow-up) are ignored.
    assert suggest_learning_rate([*lrs, 2.0], [*losses, math.inf]) == pytest.approx(1e-3, rel=1e-6)
    # A loss that only rises: the smallest lr tried (the range started too high).
    assert suggest_learning_rate(lrs[:20], list(range(20))) == lrs[0]
    with pytest.raises(ValueError):
        suggest_learning_rate(lrs, losses[:-1])


def test_range_test_on_the_tiny_model(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = validate_config(tiny_config(tiny_model_dir, tiny_data, run_dir))
    out = tmp_path / "lr"
    result = lr_range_test(config, min_lr=1e-5, max_lr=10.0, steps=30, out_dir=out, show_progress=False)

    assert not run_dir.exists(), "the range test must not create or touch a run directory"
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["lrs"] == result.lrs and saved["losses"] == result.losses
    assert saved["suggestion"] == result.suggestion

    expected = geometric_lrs(1e-5, 10.0, 30)
    assert 2 <= len(result.lrs) <= 30
    assert result.lrs == expected[: len(result.lrs)]
    assert all(a < b for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    assert result.losses == pytest.approx(smooth_losses(result.raw_losses))
    assert 1e-5 <= result.suggestion <= 10.0
    assert result.suggestion == suggest_learning_rate(result.lrs, result.losses)
    assert result.head_suggestion == pytest.approx(result.suggestion)  # tiny_config: head lr == body lr
    # An lr of 10 wrecks the model: the loss blows up and the test stops before the end.
    assert result.stopped_early and len(result.lrs) < 30
    assert max(result.losses) > 3 * min(result.losses)


def test_range_test_uses_the_configured_finetuning_method(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run")
    raw["finetune"] = {"method": "lora", "lora": {"r": 2, "target_modules": ["query", "value"]}}
    result = lr_range_test(
        validate_config(raw), min_lr=1e-5, max_lr=1.0, steps=8, out_dir=tmp_path / "lr", show_progress=False
    )
    assert (tmp_path / "lr" / "lr_find.png").is_file()
    assert 1e-5 <= result.suggestion <= 1.0
    assert not (tmp_path / "run").exists()


def test_bad_target_module_fails_before_any_step(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run")
    raw["finetune"] = {"method": "lora", "lora": {"target_modules": ["no_such_layer"]}}
    with pytest.raises(ConfigError, match=r"finetune\.lora\.target_modules: 'no_such_layer'"):
        lr_range_test(validate_config(raw), steps=5, out_dir=tmp_path / "lr", show_progress=False)
    assert not (tmp_path / "lr").exists()


def _range_losses(raw: dict, tmp_path: Path, name: str) -> list[float]:
    config = validate_config(raw)
    result = lr_range_test(config, min_lr=1e-2, max_lr=1e-1, steps=8, out_dir=tmp_path / name, show_progress=False)
    return result.raw_losses


ADALORA = {"r": 4, "target_r": 2, "tinit": 0.1, "tfinal": 0.3, "delta_t": 2, "target_modules": ["query", "value"]}


@pytest.mark.parametrize(
    ("section", "baseline", "changed"),
    [
        # Distillation: soft targets from a teacher instead of the labels alone.
        ("distill", {"alpha": 0.0}, {"alpha": 1.0, "temperature": 2.0}),
        # AdaLoRA's rank update after each step: a budget that prunes a quarter of the ranks, or three quarters.
        ("finetune", {**ADALORA, "target_r": 3}, {**ADALORA, "target_r": 1}),
        # AdaLoRA's orthogonality penalty, added once per step.
        ("finetune", {**ADALORA, "orth_reg_weight": 0.0}, {**ADALORA, "orth_reg_weight": 2.0}),
    ],
    ids=["distillation", "adalora-rank-update", "adalora-penalty"],
)
def test_range_test_trains_with_the_training_loops_step(
    tiny_model_dir: Path,
    tiny_data: dict,
    trained_tiny_run: Path,
    tmp_path: Path,
    section: str,
    baseline: dict,
    changed: dict,
) -> None:
    """Each pair differs only in a setting that the training step honours: the range test must see it too.

    Same seed, same data, one thread: a range test that ignored the setting would give identical losses.
    """
    losses = {}
    for name, options in (("baseline", baseline), ("changed", changed)):
        raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run")
        if section == "distill":
            raw["distill"] = {"teacher": str(trained_tiny_run), **options}
        else:
            raw["finetune"] = {"method": "adalora", "adalora": options}
        losses[name] = _range_losses(raw, tmp_path, name)
    assert losses["baseline"] != losses["changed"]


def test_range_test_without_teacher_weight_matches_plain_training(
    tiny_model_dir: Path, tiny_data: dict, trained_tiny_run: Path, tmp_path: Path
) -> None:
    # alpha 0 is the labels' cross-entropy alone: the teacher is looked up but weighs nothing.
    plain = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run")
    distilled = {**plain, "distill": {"teacher": str(trained_tiny_run), "alpha": 0.0}}
    assert _range_losses(plain, tmp_path, "plain") == _range_losses(distilled, tmp_path, "distilled")
