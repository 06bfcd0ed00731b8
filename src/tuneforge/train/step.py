"""One optimizer step, and what it trains on: shared by the training loop and the learning-rate range test.

Both must train exactly the same way (the range test measures the set-up training will use), so the
step lives here once: for each micro-batch of the step a forward/backward with the configured
regularizers and, when distilling, the teacher's soft targets; then the fine-tuning method's extra
loss, gradient clipping, the optimizer step, the method's own update (AdaLoRA's rank budget) and the
weight average.

On several processes (:mod:`tuneforge.train.distributed`) each process takes every ``world_size``-th
example of each micro-batch, so the step still covers the same global batch: the micro-batches come from
the same seeded, length-grouped order, and a process's share of one has texts of about the same length
as the others' (no process waits long on another's long batch). Each process weights its loss by its
share of the step's samples times ``world_size``; DistributedDataParallel averages the gradients, so the
step follows the same mean loss as on one process (up to the order of float additions).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneforge import adapters
from tuneforge.config import DistillConfig, RunConfig, TrainConfig
from tuneforge.data.batching import collate, encode_texts, length_grouped_batches
from tuneforge.train.distill import NO_LABEL, teacher_targets
from tuneforge.train.distributed import Dist, shard, sum_across
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

    def teacher(self, indices: list[int], device: torch.device | None = None) -> Teacher | None:
        if self.teacher_logits is None or self.distill is None:
            return None
        logits = self.teacher_logits[indices]
        return Teacher(to_device(logits, device), self.distill.temperature, self.distill.alpha)


def to_device(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory, so the copy overlaps the work."""
    if device is None or device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class AutocastForward(torch.nn.Module):
    """The model's forward under autocast (bf16/fp16), its logits back in float32 for the loss, as the
    mixed-precision recipes do; the weights, gradients and optimizer stay float32."""

    def __init__(self, model: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, **batch: torch.Tensor) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            output = self.model(**batch)
        output.logits = output.logits.float()
        return output

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Engine:
    """Where and how a step runs: this process's place (device, rank), the module that runs the forward
    passes (the model under autocast and/or DistributedDataParallel; None: the model itself) and, for
    fp16, the loss scaler. ``Engine()`` is one process on the CPU in float32: the plain step."""

    here: Dist = field(default_factory=Dist)
    forward: torch.nn.Module | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def ddp(self) -> torch.nn.parallel.DistributedDataParallel | None:
        forward = self.forward
        return forward if isinstance(forward, torch.nn.parallel.DistributedDataParallel) else None

    def close(self) -> None:
        """Let go of DistributedDataParallel while its process group is open: freed after the group is
        closed, it holds the group's last reference, whose destructor can deadlock on the GIL."""
        self.forward = None


def build_engine(model: torch.nn.Module, here: Dist, precision: str) -> Engine:
    """The :class:`Engine` for ``model`` (already on ``here.device``). DistributedDataParallel broadcasts
    rank 0's weights as it wraps them, so every process starts from the same ones."""
    forward = model
    if precision != "fp32":
        forward = AutocastForward(model, here.device.type, PRECISIONS[precision])
    if here.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward,
            device_ids=[here.device.index] if here.device.type == "cuda" else None,
            forward_sync_buffers=False,  # BERT's buffers (position ids) are constants: synced once, at init
        )
    scaler = torch.amp.GradScaler(here.device.type) if precision == "fp16" else None
    return Engine(here, None if forward is model else forward, scaler)


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
    device: torch.device | None = None,
) -> torch.Tensor:
    """The distillation teacher's logits on ``texts`` (only the ``needed`` rows, if given; the teacher on
    ``device``), with a progress bar: it can take as long as the training."""
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
            device=device,
        )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    group: list[list[int]],
    data: TrainingSet,
    cfg: TrainConfig,
    step: int,
    average: WeightAverage | None = None,
    engine: Engine | None = None,
) -> float:
    """One optimizer step (0-based index ``step``) over the micro-batches in ``group``; returns its mean loss.

    Gradients accumulate over the micro-batches, each weighted by its share of the step's samples, so
    the step follows the mean loss over all of them whatever the split. The learning rate is the
    caller's to set beforehand (a schedule, or the range test's sweep). ``engine``: device, precision and
    processes (default: one process on the CPU, float32); ``group`` is the whole step's, on every process.
    """
    engine = engine or Engine()
    here, forward, ddp = engine.here, engine.forward or model, engine.ddp
    n_samples = sum(len(b) for b in group)
    loss_sum = 0.0
    for k, indices in enumerate(group):
        mine = shard(indices, here)
        weight = len(mine) / n_samples * here.world_size  # DDP divides the gradient sum by world_size
        if not mine:  # fewer texts than processes: a no-op pass, since every process joins each all-reduce
            mine, weight = indices[:1], 0.0
        batch = collate([data.ids[i] for i in mine], data.pad_id)
        batch = {key: to_device(value, here.device) for key, value in batch.items()}
        # Gradients are exchanged once per step: at the last micro-batch's backward.
        with ddp.no_sync() if ddp is not None and k < len(group) - 1 else nullcontext():
            loss = regularized_backward(
                forward,
                batch,
                to_device(data.labels[mine], here.device),
                cfg,
                weight=engine.scaler.scale(torch.tensor(weight, device=here.device)) if engine.scaler else weight,
                teacher=data.teacher(mine, here.device),
            )
        loss_sum += loss * len(mine) if weight else 0.0
    loss_sum = sum_across(loss_sum, here)
    penalty = adapters.extra_loss(model)  # AdaLoRA's orthogonality term: once per step, not per micro-batch
    if penalty is not None:
        (engine.scaler.scale(penalty) if engine.scaler else penalty).backward()
    if engine.scaler is not None:
        engine.scaler.unscale_(optimizer)  # clip and read true gradients
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    if engine.scaler is not None:
        engine.scaler.step(optimizer)  # skipped when fp16 overflowed; the scale shrinks
        engine.scaler.update()
    else:
        optimizer.step()
    adapters.after_backward(model, step)  # reads the gradients: before they are cleared
    optimizer.zero_grad(set_to_none=True)
    if average is not None:
        average.update(step)
    return loss_sum / n_samples
