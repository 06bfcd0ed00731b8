"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks").

Train for a few dozen steps while the learning rate grows exponentially from tiny to huge, and watch
the loss: flat while the lr is too small to matter, falling once it is large enough, then exploding
once it is too large. A good peak lr lies well inside the falling part. The test trains a throw-away
copy of the configured model with the configured optimizer, batch size, loss and regularizers (the
training loop's own ``train_step``: distillation, the method's extra loss and update, clipping), and
writes only ``lr_find.json`` and ``lr_find.png`` into ``out_dir``: no run directory is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch
from rich.console import Console

from tuneforge.config import RunConfig, TrainConfig
from tuneforge.data import prepare_data
from tuneforge.errors import ConfigError
from tuneforge.files import atomic_write_json, atomic_write_with
from tuneforge.models.loading import load_tokenizer
from tuneforge.train.optim import set_learning_rate
from tuneforge.train.setup import trainable_model
from tuneforge.train.step import encode_training_set, epoch_batches, progress_bar, teacher_pass, train_step

JSON_NAME = "lr_find.json"
PNG_NAME = "lr_find.png"
# Stop once the smoothed loss exceeds this multiple of the best smoothed loss so far: it has diverged.
DIVERGENCE_FACTOR = 4.0
# Weight of the past in the loss's exponential moving average. fastai uses 0.98, but over 30-100 steps
# spanning 7 decades of lr that averages over ~50 steps (3-4 decades) and drags the curve far to the
# right; 0.9 (~10 steps) still removes most batch-to-batch noise.
SMOOTHING = 0.9
SUGGESTION_RULE = "lr at the minimum of the smoothed loss, divided by 10"


@dataclass
class LRFindResult:
    lrs: list[float]  # body learning rate of each step taken (the head's keeps its ratio to it)
    losses: list[float]  # smoothed training loss after each step
    raw_losses: list[float]  # the step's own loss
    suggestion: float  # suggested body learning rate (train.learning_rate)
    head_suggestion: float  # the same ratio applied to the head (train.head_learning_rate)
    stopped_early: bool  # the loss diverged before max_lr
    json_path: Path
    png_path: Path


def geometric_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """``steps`` learning rates from ``min_lr`` to ``max_lr``, each a constant factor above the last."""
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr range test: need 0 < min_lr < max_lr (got min_lr={min_lr}, max_lr={max_lr})")
    if steps < 2:
        raise ConfigError(f"lr range test: steps must be at least 2 (got {steps})")
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth_losses(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (so the first values are not pulled towards 0)."""
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1.0 - beta) * loss
        smoothed.append(average / (1.0 - beta ** (i + 1)))
    return smoothed


def suggest_learning_rate(lrs: list[float], smoothed: list[float]) -> float:
    """The lr at the minimum of the smoothed loss, divided by 10 (and at least the smallest lr tried).

    Why not the steepest descent of loss vs log lr: that is a derivative of a noisy curve, and over
    the 30-100 steps a CPU run can afford its argmin jumps between noise wiggles, often into the flat
    start or right next to the blow-up. The minimum of the smoothed curve is a far steadier statistic.
    At the minimum the lr is already at the edge of stability (and the smoothing's lag puts the
    observed minimum a little late), so backing off by a decade lands inside the descending part:
    Smith's and fastai's original rule of thumb.
    """
    if not lrs or len(lrs) != len(smoothed):
        raise ValueError("need one smoothed loss per learning rate, and at least one")
    finite = [i for i, loss in enumerate(smoothed) if math.isfinite(loss)]
    if not finite:
        raise ValueError("no finite loss to suggest a learning rate from")
    best = min(finite, key=lambda i: smoothed[i])
    return max(lrs[best] / 10.0, lrs[0])


def _step_groups(lengths: list[int], cfg: TrainConfig) -> Iterator[list[list[int]]]:
    """Optimizer steps' micro-batches, epoch after epoch, in the training loop's seeded order."""
    for epoch in count():
        batches = epoch_batches(lengths, cfg, epoch)
        for start in range(0, len(batches), cfg.grad_accum_steps):
            yield batches[start : start + cfg.grad_accum_steps]


def _plot(result_lrs: list[float], raw: list[float], smoothed: list[float], suggestion: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        ax.plot(result_lrs, raw, color="tab:blue", alpha=0.25, linewidth=1, label="step loss")
        ax.plot(result_lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
        nearest = min(range(len(result_lrs)), key=lambda i: abs(math.log(result_lrs[i] / suggestion)))
        ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([suggestion], [smoothed[nearest]], "o", color="tab:red", label=f"suggested lr {suggestion:.2e}")
        ax.set_xscale("log")
        # Cut the y-axis at 1.5x the starting loss so that a blow-up does not flatten the interesting part.
        low, top = min(smoothed), min(max(smoothed), 1.5 * max(smoothed[0], min(smoothed)))
        margin = 0.05 * (top - low) + 1e-6
        ax.set_ylim(low - margin, top + margin)
        ax.set_xlabel("learning rate (body; log scale)")
        ax.set_ylabel("training loss")
        ax.set_title("learning-rate range test")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def lr_range_test(
    config: RunConfig,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    steps: int = 100,
    out_dir: Path,
    console: Console | None = None,
    show_progress: bool = True,
) -> LRFindResult:
    """Run the range test for ``config``'s model, data, optimizer and loss; write the JSON and PNG into ``out_dir``.

    Step ``i`` trains at body lr ``min_lr * (max_lr / min_lr) ** (i / (steps - 1))``; the head's lr keeps
    the ratio ``head_learning_rate / learning_rate``, and momentum stays at the optimizer's own value.
    The test stops early when the smoothed loss exceeds ``DIVERGENCE_FACTOR`` times its best value or
    the loss is no longer finite. The suggestion is :func:`suggest_learning_rate`'s.
    """
    console = console or Console(stderr=True)
    lrs = geometric_lrs(min_lr, max_lr, steps)
    out_dir = Path(out_dir)
    cfg, tcfg = config, config.train
    torch.set_num_threads(tcfg.threads or os.cpu_count() or 1)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, seed=tcfg.seed, tokenizer=tokenizer, max_length=cfg.model.max_length)
    torch.manual_seed(tcfg.seed)
    model, optimizer = trainable_model(cfg, data.labels, total_steps=steps)

    teacher_logits = None
    if cfg.distill.teacher is not None:
        teacher_logits = teacher_pass(cfg, data.train.texts, data.labels, console, show_progress)
    train_set = encode_training_set(
        cfg, tokenizer, data.train.texts, data.train.labels, data.labels, teacher_logits=teacher_logits
    )
    step_groups = _step_groups(train_set.lengths, tcfg)

    raw: list[float] = []
    smoothed: list[float] = []
    best = math.inf
    stopped_early = False
    model.train()
    with progress_bar(console, show_progress, remaining=False) as progress:
        task = progress.add_task("lr range test", total=steps, info="")
        for step, lr in enumerate(lrs):
            set_learning_rate(optimizer, lr / tcfg.learning_rate)
            loss = train_step(model, optimizer, next(step_groups), train_set, tcfg, step)
            if not math.isfinite(loss):
                stopped_early = True
                break
            raw.append(loss)
            smoothed.append(smooth_losses(raw)[-1])
            best = min(best, smoothed[-1])
            progress.update(task, advance=1, info=f"lr {lr:.2e}  loss {smoothed[-1]:.4f}")
            if smoothed[-1] > DIVERGENCE_FACTOR * best:
                stopped_early = True
                break

    if not raw:
        raise ConfigError(f"lr range test: the loss is not finite even at min_lr={min_lr}; try a smaller min_lr")
    tried = lrs[: len(raw)]
    suggestion = suggest_learning_rate(tried, smoothed)
    head_ratio = (tcfg.head_learning_rate or tcfg.learning_rate) / tcfg.learning_rate
    json_path, png_path = out_dir / JSON_NAME, out_dir / PNG_NAME
    atomic_write_json(
        json_path,
        {
            "suggestion": suggestion,
            "head_suggestion": suggestion * head_ratio,
            "rule": SUGGESTION_RULE,
            "optimizer": tcfg.optimizer,
            "batch_size": tcfg.batch_size * tcfg.grad_accum_steps,
            "min_lr": min_lr,
            "max_lr": max_lr,
            "steps": steps,
            "stopped_early": stopped_early,
            "smoothing": SMOOTHING,
            "lrs": tried,
            "losses": smoothed,
            "raw_losses": raw,
        },
    )
    _plot(tried, raw, smoothed, suggestion, png_path)
    end = f"stopped at lr {tried[-1]:.2e} (loss diverged)" if stopped_early else f"reached max_lr {max_lr:.2e}"
    console.print(f"lr range test: {len(raw)} steps, {end}")
    console.print(
        f"suggested train.learning_rate: {suggestion:.2e} (head {suggestion * head_ratio:.2e}; {SUGGESTION_RULE})"
    )
    console.print(f"wrote {png_path} and {json_path}")
    return LRFindResult(
        lrs=tried,
        losses=smoothed,
        raw_losses=raw,
        suggestion=suggestion,
        head_suggestion=suggestion * head_ratio,
        stopped_early=stopped_early,
        json_path=json_path,
        png_path=png_path,
    )
