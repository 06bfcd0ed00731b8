"""One optimizer step, and what it trains on: shared by the training loop and the learning-rate range test.

Both must train exactly the same way (the range test measures the set-up training will use), so the
step lives here once: for each micro-batch of the step a forward/backward with the configured
regularizers and, when distilling, the teacher's soft targets; then the fine-tuning method's extra
loss, gradient clipping, the optimizer step, the method's own update (AdaLoRA's rank budget) and the
weight average.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneforge import adapters
from tuneforge.config import DistillConfig, RunConfig, TrainConfig
from tuneforge.data.batching import collate, encode_texts, length_grouped_batches
from tuneforge.train.distill import NO_LABEL, teacher_targets
from tuneforge.train.ema import WeightAverage
from tuneforge.train.regularize import Teacher, regularized_backward


@dataclass(frozen=True)
class TrainingSet:
    """The training split as the step consumes it: token ids, label indices and, when distilling, the
    teacher's logits on every example (looked up by index in each micro-batch)."""

    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int
    teacher_logits: torch.Tensor | None = None
    distill: DistillConfig | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def teacher(self, indices: list[int]) -> Teacher | None:
        if self.teacher_logits is None or self.distill is None:
            return None
        return Teacher(self.teacher_logits[indices], self.distill.temperature, self.distill.alpha)


def encode_training_set(
    cfg: RunConfig,
    tokenizer: Any,
    texts: list[str],
    labels: list[str],
    label_names: list[str],
    teacher_logits: torch.Tensor | None = None,
    unlabelled_texts: Sequence[str] = (),
) -> TrainingSet:
    """Tokenise once; batches are padded later, only to their own longest text.

    ``unlabelled_texts`` (transfer data) follow the labelled ones with the label ``NO_LABEL``: the
    teacher's logits, which then cover them too, are their only target.
    """
    index = {name: i for i, name in enumerate(label_names)}
    return TrainingSet(
        ids=encode_texts(tokenizer, [*texts, *unlabelled_texts], cfg.model.max_length),
        labels=torch.tensor([index[y] for y in labels] + [NO_LABEL] * len(unlabelled_texts)),
        pad_id=tokenizer.pad_token_id or 0,
        teacher_logits=teacher_logits,
        distill=cfg.distill if teacher_logits is not None else None,
    )


def epoch_batches(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The micro-batches of ``epoch``: their order depends only on (seed, epoch), so a resumed run replays it."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return length_grouped_batches(lengths, cfg.batch_size, generator=generator, group_by_length=cfg.group_by_length)


def progress_bar(console: Console, enabled: bool, *, remaining: bool = True, info: bool = True) -> Progress:
    """Rich progress; with ``info``, every task must carry an ``info`` field (shown after the bar)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, disable=not enabled)


def teacher_pass(
    cfg: RunConfig,
    texts: list[str],
    labels: list[str],
    console: Console,
    show_progress: bool,
    *,
    needed: list[int] | None = None,
) -> torch.Tensor:
    """The distillation teacher's logits on ``texts`` (only the ``needed`` rows, if given), with a
    progress bar: it can take as long as the training."""
    with progress_bar(console, show_progress) as progress:
        total = len(texts) if needed is None else len(needed)
        task = progress.add_task("teacher", total=total, info=str(cfg.distill.teacher))
        return teacher_targets(
            cfg.distill,
            texts,
            labels,
            needed=needed,
            on_batch=lambda done: progress.advance(task, done),
            on_cached=lambda found: progress.advance(task, found),
        )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    group: list[list[int]],
    data: TrainingSet,
    cfg: TrainConfig,
    step: int,
    average: WeightAverage | None = None,
) -> float:
    """One optimizer step (0-based index ``step``) over the micro-batches in ``group``; returns its mean loss.

    Gradients accumulate over the micro-batches, each weighted by its share of the step's samples, so
    the step follows the mean loss over all of them whatever the split. The learning rate is the
    caller's to set beforehand (a schedule, or the range test's sweep).
    """
    n_samples = sum(len(b) for b in group)
    loss_sum = 0.0
    for indices in group:
        batch = collate([data.ids[i] for i in indices], data.pad_id)
        loss = regularized_backward(
            model, batch, data.labels[indices], cfg, weight=len(indices) / n_samples, teacher=data.teacher(indices)
        )
        loss_sum += loss * len(indices)
    penalty = adapters.extra_loss(model)  # AdaLoRA's orthogonality term: once per step, not per micro-batch
    if penalty is not None:
        penalty.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    adapters.after_backward(model, step)  # reads the gradients: before they are cleared
    optimizer.zero_grad(set_to_none=True)
    if average is not None:
        average.update(step)
    return loss_sum / n_samples
