"""Fine-tune a pretrained encoder as a text classifier: the whole loop, top to bottom.

Read in order: prepare the run directory and data, load the model, build the optimizer, then the
loop (length-grouped batches → forward → loss → backward → clip → step), with evaluation, early
stopping and checkpoints woven in. Everything a resumed run needs is in the checkpoint, and every
random choice comes from the seed, so a run killed at any point and resumed ends exactly like one
that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneforge import adapters
from tuneforge.config import RunConfig
from tuneforge.data import PreparedData, format_audit, prepare_data
from tuneforge.data.batching import collate, encode_texts, length_grouped_batches
from tuneforge.errors import RunDirError
from tuneforge.files import atomic_replace_dir, atomic_write_json, atomic_write_text
from tuneforge.metrics import classification_metrics, plot_confusion_matrix
from tuneforge.models.loading import load_tokenizer, predict_logits
from tuneforge.models.runs import load_run_classifier
from tuneforge.rundir import RunDir
from tuneforge.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from tuneforge.train.distill import load_teacher_logits, save_teacher_logits, teacher_targets
from tuneforge.train.ema import WeightAverage
from tuneforge.train.optim import apply_schedule
from tuneforge.train.regularize import Teacher, regularized_backward
from tuneforge.train.setup import trainable_model

LOG_EVERY_STEPS = 20
# Fault injection for the crash test: SIGKILL this process right after the given optimizer step.
KILL_AT_STEP_ENV = "TUNEFORGE_FAULT_KILL_AT_STEP"
# Keys that may differ between the original run and its resumption without changing the result.
RESUME_IGNORED_KEYS = {("train", "threads")}


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]


def auto_epochs(n_train: int, cfg_epochs: int | None, min_samples: int, min_epochs: int, max_epochs: int) -> int:
    """Small datasets need many passes, large ones few. Aim for ~min_samples examples seen, but never
    fewer than min_epochs: on a large dataset a small encoder still gains from the later, low-lr passes."""
    if cfg_epochs is not None:
        return cfg_epochs
    return max(min_epochs, min(max_epochs, math.ceil(min_samples / max(1, n_train))))


def _check_run_dir(config: RunConfig, *, resume: bool, overwrite: bool) -> RunDir:
    run = RunDir(config.output.dir)
    if resume:
        if not has_checkpoint(run.checkpoint_dir):
            raise RunDirError(f"output.dir: {run.path} has no checkpoint to resume from")
        saved = run.config_file.read_text(encoding="utf-8") if run.config_file.exists() else ""
        _check_same_config(saved, config, run.path)
    elif run.path.exists() and any(run.path.iterdir()) and not overwrite:
        raise RunDirError(f"output.dir: {run.path} already exists; pass --overwrite to replace it or --resume")
    return run


def _check_same_config(saved_yaml: str, config: RunConfig, path: Path) -> None:
    import yaml

    saved = yaml.safe_load(saved_yaml) or {}
    current = config.model_dump(mode="json")
    for section, values in current.items():
        for key, value in values.items():
            if (section, key) in RESUME_IGNORED_KEYS:
                continue
            if saved.get(section, {}).get(key) != value:
                raise RunDirError(
                    f"{section}.{key}: differs from the interrupted run in {path} "
                    f"({saved.get(section, {}).get(key)!r} there, {value!r} now); resume with the same config"
                )


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
    )


def _save_model(run: RunDir, cfg: RunConfig, model: torch.nn.Module, tokenizer: Any, labels: list[str]) -> None:
    """Keep the current weights as the run's model: a full HF folder, or the adapter and head alone."""
    if cfg.finetune.method != "full":
        adapters.save_adapter(
            model, run.adapter_dir, base_model_name=cfg.model.name, labels=labels, tokenizer=tokenizer
        )
        return

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_replace_dir(run.model_dir, write)


def _evaluate(
    model: torch.nn.Module, ids: list[list[int]], labels: list[int], label_names: list[str], pad_id: int, bs: int
) -> dict[str, Any]:
    predictions = predict_logits(model, ids, pad_id=pad_id, batch_size=bs).argmax(axis=-1).tolist()
    return classification_metrics(labels, predictions, label_names)


def _append_log(run: RunDir, record: dict[str, Any]) -> None:
    with run.train_log_file.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(run: RunDir, last_step: int) -> None:
    """After a resume, forget log lines written after the checkpoint: they will be written again."""
    if not run.train_log_file.exists():
        return
    kept = [
        line
        for line in run.train_log_file.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    atomic_write_text(run.train_log_file, "".join(line + "\n" for line in kept))


def _teacher_logits(
    cfg: RunConfig,
    run: RunDir,
    texts: list[str],
    labels: list[str],
    resume: bool,
    console: Console,
    show_progress: bool,
) -> torch.Tensor | None:
    """Distillation's soft targets: the fixed teacher's logits on every training text.

    One pass of the teacher per run; a resumed run reuses the logits kept beside its checkpoint.
    """
    if cfg.distill.teacher is None:
        return None
    if resume and (kept := load_teacher_logits(run.teacher_logits_file, cfg.distill, texts)) is not None:
        console.print(f"distillation: reusing the teacher's logits kept in {run.teacher_logits_file}")
        return kept
    with _progress(console, show_progress) as progress:
        task = progress.add_task("teacher", total=len(texts), info=str(cfg.distill.teacher))
        return teacher_targets(cfg.distill, texts, labels, on_batch=lambda done: progress.advance(task, done))


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> TrainResult:
    console = console or Console(stderr=True)
    cfg, tcfg = config, config.train
    torch.set_num_threads(tcfg.threads or os.cpu_count() or 1)

    # 1. Validate everything before touching the disk: a bad input must not damage an earlier run.
    run = _check_run_dir(cfg, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(cfg.model)
    data: PreparedData = prepare_data(cfg.data, seed=tcfg.seed, tokenizer=tokenizer, max_length=cfg.model.max_length)
    label_names = data.labels
    batches_per_epoch = math.ceil(len(data.train) / tcfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / tcfg.grad_accum_steps)
    epochs = auto_epochs(
        len(data.train), tcfg.epochs, tcfg.min_train_samples, tcfg.min_auto_epochs, tcfg.max_auto_epochs
    )
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(tcfg.warmup_ratio * total_steps)
    # What learns (everything, or an adapter and the head) and the optimizer.
    torch.manual_seed(tcfg.seed)
    model, optimizer = trainable_model(cfg, label_names, total_steps=total_steps)
    trainable, total = adapters.trainable_parameter_count(model)
    average = WeightAverage(model, tcfg.ema_decay) if tcfg.ema_decay is not None else None
    console.print(format_audit(data.audit))
    soft_targets = _teacher_logits(cfg, run, data.train.texts, label_names, resume, console, show_progress)

    if not resume:
        if run.path.exists():
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True)
        atomic_write_text(run.config_file, cfg.to_yaml())
        atomic_write_json(run.labels_file, label_names)
        atomic_write_json(run.audit_file, data.audit)
    if soft_targets is not None:
        save_teacher_logits(run.teacher_logits_file, soft_targets, cfg.distill, data.train.texts)

    # 2. Tokenise once; batches are padded only to their own longest text.
    label_index = {name: i for i, name in enumerate(label_names)}
    train_ids = encode_texts(tokenizer, data.train.texts, cfg.model.max_length)
    train_y = torch.tensor([label_index[y] for y in data.train.labels])
    val_ids = encode_texts(tokenizer, data.validation.texts, cfg.model.max_length)
    val_y = [label_index[y] for y in data.validation.labels]
    lengths = [len(x) for x in train_ids]
    pad_id = tokenizer.pad_token_id or 0

    state: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "samples": 0,
        "train_seconds": 0.0,
        "best": None,
        "best_step": None,
        "bad_evals": 0,
        "done": False,
        "history": [],
    }
    if resume:
        saved = load_checkpoint(run.checkpoint_dir, model, optimizer)
        state = saved.loop_state
        adapters.load_training_state(model, saved.method_state)
        if average is not None:
            average.load_state_dict(saved.weight_average)
        _truncate_log(run, state["step"])
        console.print(f"resuming {run.path} at step {state['step']}/{total_steps} (epoch {state['epoch'] + 1})")
    console.print(
        f"training {len(train_ids)} examples, {len(label_names)} labels, {epochs} epochs, "
        f"{total_steps} steps of {tcfg.batch_size * tcfg.grad_accum_steps}; {cfg.finetune.method} fine-tuning, "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
    )

    def evaluate_and_track() -> None:
        # With a weight average, it is the average that is judged and kept; training goes on from the live weights.
        with average.applied() if average is not None else nullcontext():
            metrics = _evaluate(model, val_ids, val_y, label_names, pad_id, tcfg.eval_batch_size)
            score = metrics[tcfg.metric]
            improved = state["best"] is None or score > state["best"]
            if improved:
                state.update(best=score, best_step=state["step"], bad_evals=0)
                _save_model(run, cfg, model, tokenizer, label_names)
            else:
                state["bad_evals"] += 1
        record = {
            "step": state["step"],
            "epoch": state["epoch"],
            "eval": tcfg.metric,
            "value": score,
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "improved": improved,
        }
        state["history"].append(record)
        _append_log(run, record)
        progress.console.print(
            f"step {state['step']}: validation {tcfg.metric} {score:.2f}" + (" (best, saved)" if improved else "")
        )
        patience = tcfg.early_stopping_patience
        if patience is not None and state["bad_evals"] >= patience:
            state["done"] = True
            progress.console.print(f"early stopping: no improvement in {patience} evaluations")

    def checkpoint() -> None:
        weight_average = average.state_dict() if average is not None else None
        save_checkpoint(run.checkpoint_dir, model, optimizer, state, adapters.training_state(model), weight_average)

    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    model.train()
    with _progress(console, show_progress) as progress:
        task = progress.add_task("train", total=total_steps, completed=state["step"], info="")
        while not state["done"] and state["epoch"] < epochs:
            # The epoch's order depends only on (seed, epoch), so a resumed run replays it exactly.
            generator = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + state["epoch"])
            batches = length_grouped_batches(
                lengths, tcfg.batch_size, generator=generator, group_by_length=tcfg.group_by_length
            )
            while state["batch"] < len(batches) and not state["done"]:
                started = time.perf_counter()
                group = batches[state["batch"] : state["batch"] + tcfg.grad_accum_steps]
                n_samples = sum(len(b) for b in group)
                apply_schedule(
                    optimizer, state["step"], total_steps=total_steps, warmup_steps=warmup_steps, schedule=tcfg.schedule
                )
                loss_sum = 0.0
                for indices in group:
                    batch = collate([train_ids[i] for i in indices], pad_id)
                    # Weight each micro-batch by its size so the step's loss is the mean over all its samples.
                    teacher = None
                    if soft_targets is not None:
                        teacher = Teacher(soft_targets[indices], cfg.distill.temperature, cfg.distill.alpha)
                    loss = regularized_backward(
                        model, batch, train_y[indices], tcfg, weight=len(indices) / n_samples, teacher=teacher
                    )
                    loss_sum += loss * len(indices)
                penalty = adapters.extra_loss(model)  # AdaLoRA's orthogonality term: once per step
                if penalty is not None:
                    penalty.backward()
                if tcfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
                optimizer.step()
                adapters.after_backward(model, state["step"])
                optimizer.zero_grad(set_to_none=True)
                if average is not None:
                    average.update(state["step"])

                state["step"] += 1
                state["batch"] += len(group)
                state["samples"] += n_samples
                state["train_seconds"] += time.perf_counter() - started
                speed = state["samples"] / max(state["train_seconds"], 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                progress.update(
                    task,
                    completed=state["step"],
                    info=f"loss {loss_sum / n_samples:.4f}  lr {lr:.2e}  {speed:.1f} samples/s",
                )
                if state["step"] % LOG_EVERY_STEPS == 0:
                    _append_log(
                        run,
                        {
                            "step": state["step"],
                            "epoch": state["epoch"],
                            "loss": loss_sum / n_samples,
                            "lr": lr,
                            "samples_per_s": speed,
                        },
                    )
                evaluated = bool(tcfg.eval_every_steps) and state["step"] % tcfg.eval_every_steps == 0
                if evaluated:
                    evaluate_and_track()
                if evaluated or state["step"] % tcfg.checkpoint_every_steps == 0:
                    checkpoint()
                if kill_at and state["step"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            if not state["done"]:
                state["epoch"] += 1
                state["batch"] = 0
                if not tcfg.eval_every_steps:
                    evaluate_and_track()
                checkpoint()

    if cfg.finetune.merge:
        _write_merged_model(run, tokenizer)
    counts = {"trainable_parameters": trainable, "total_parameters": total}
    return _finish(run, cfg, data, state, label_names, console, counts)


def _write_merged_model(run: RunDir, tokenizer: Any) -> None:
    """The kept adapter folded into the base weights: a plain HF model, as fast as the base."""
    adapted, _ = load_run_classifier(run, prefer="adapter")
    merged = adapters.merge_adapter(adapted)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_replace_dir(run.model_dir, write)


def _finish(
    run: RunDir,
    cfg: RunConfig,
    data: PreparedData,
    state: dict[str, Any],
    label_names: list[str],
    console: Console,
    counts: dict[str, int],
) -> TrainResult:
    """Evaluate the kept (best) model exactly as later stages will load it, then drop the checkpoint."""
    model, tokenizer = load_run_classifier(run)
    pad_id = tokenizer.pad_token_id or 0
    label_index = {name: i for i, name in enumerate(label_names)}
    bs, max_len = cfg.train.eval_batch_size, cfg.model.max_length
    metrics: dict[str, Any] = {}
    splits = {"validation": data.validation, "test": data.test}
    for split, texts in splits.items():
        if texts is None or len(texts) == 0:
            continue
        ids = encode_texts(tokenizer, texts.texts, max_len)
        metrics[split] = _evaluate(model, ids, [label_index[y] for y in texts.labels], label_names, pad_id, bs)
    metrics["train"] = {
        "examples": len(data.train),
        "steps": state["step"],
        "epochs_completed": state["epoch"],
        "samples_per_second": round(state["samples"] / max(state["train_seconds"], 1e-9), 2),
        "train_seconds": round(state["train_seconds"], 1),
        "best_step": state["best_step"],
        f"best_validation_{cfg.train.metric}": state["best"],
        "stopped_early": state["done"],
        **counts,
    }
    atomic_write_json(run.metrics_file, metrics)
    shown = "test" if "test" in metrics else "validation"
    plot_confusion_matrix(
        metrics[shown]["confusion_matrix"], label_names, run.confusion_png, f"{shown} confusion matrix"
    )
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    for split in ("validation", "test"):
        if split in metrics:
            console.print(
                f"{split}: accuracy {metrics[split]['accuracy']:.2f}  macro-F1 {metrics[split]['macro_f1']:.2f}  "
                f"(n={metrics[split]['n']})"
            )
    console.print(f"run directory: {run.path}")
    return TrainResult(run_dir=run.path, metrics=metrics)
