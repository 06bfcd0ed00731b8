"""Fine-tune a pretrained encoder as a text classifier: the whole loop, top to bottom.

Read ``train`` and ``_loop`` first: set up (check the output folder, read the data, load the model, build
the optimizer), then the loop (length-grouped batches → one optimizer step → log, evaluate, checkpoint),
then finish (evaluate the kept model, calibrate its probabilities, write the metrics, swap the run
into place). Everything a resumed run needs is in the checkpoint, and every random choice comes from
the seed, so a run killed at any point and resumed ends exactly like one that was never interrupted.

A run is written into ``<output.dir>.partial`` beside its target and renamed into place only when
it has finished, so an interrupted or failed run never touches an earlier run at ``output.dir``;
``--resume`` continues from the ``.partial`` folder.

On several processes (started by torchrun, ``accelerate launch`` or ``tuneforge train --nproc N``; see
:mod:`tuneforge.train.distributed`) every process runs this same function on the same seeded batches,
each on its share of every batch, with DistributedDataParallel averaging the gradients. Rank 0 alone
writes (run folder, log, checkpoints, model) and speaks; evaluation is shared out and gathered, so
every process takes the same early-stopping decision; all processes read the checkpoint on resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from rich.console import Console

from tuneforge import adapters
from tuneforge.config import RunConfig
from tuneforge.data import PreparedData, format_audit, prepare_data
from tuneforge.data.batching import encode_texts
from tuneforge.errors import ConfigError, DataError, RunDirError
from tuneforge.files import atomic_replace_dir, atomic_write_json, atomic_write_text
from tuneforge.infer.calibration import before_after, fit_calibration, plot_reliability, save_calibration
from tuneforge.metrics import classification_metrics, plot_confusion_matrix
from tuneforge.models.loading import load_tokenizer, predict_logits
from tuneforge.models.runs import load_run_classifier
from tuneforge.rundir import RunDir, check_replaceable
from tuneforge.train.checkpoint import LoopState, has_checkpoint, load_checkpoint, rng_state, save_checkpoint
from tuneforge.train.distill import load_teacher_logits, save_teacher_logits
from tuneforge.train.distributed import Dist, gather_objects, on_main, session, shard, sum_tensor, unshard
from tuneforge.train.ema import WeightAverage
from tuneforge.train.extra_texts import (
    AugmentedCopies,
    TransferTexts,
    augmented_copies,
    save_augmented,
    save_transfer,
    summary,
    transfer_texts,
)
from tuneforge.train.optim import apply_schedule
from tuneforge.train.setup import trainable_model
from tuneforge.train.step import (
    Engine,
    TrainingSet,
    build_engine,
    encode_training_set,
    epoch_batches,
    progress_bar,
    teacher_pass,
    train_step,
)

LOG_EVERY_STEPS = 20
# Keys that may differ between the original run and its resumption without changing the result
# (calibration happens after the loop; a run started before the key existed resumes too; a run begun on a
# GPU may go on on the CPU, with other rounding).
RESUME_IGNORED_KEYS = {("train", "threads"), ("train", "calibrate"), ("train", "device")}
# The folder a run is written into until it is complete; a fixed name so that --resume finds it.
STAGING_SUFFIX = ".partial"


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]


@dataclass
class _Session:
    """Everything set-up prepares for the loop; ``run`` is the staging folder being written."""

    here: Dist
    engine: Engine
    cfg: RunConfig
    target: Path
    run: RunDir
    tokenizer: Any
    data: PreparedData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None
    train_set: TrainingSet
    val_ids: list[list[int]]
    val_y: list[int]
    epochs: int
    total_steps: int
    counts: dict[str, int]
    state: LoopState


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    on_step: Callable[[LoopState], None] | None = None,
) -> TrainResult:
    """Train ``config`` into ``config.output.dir``; ``on_step`` is called with the loop state after every
    optimizer step, once that step's evaluation and checkpoint (if due) are written (on every process)."""
    console = console or Console(stderr=True)
    with session(config.train.device) as here:
        if not here.is_main:  # rank 0 speaks for all
            console, show_progress = Console(stderr=True, quiet=True), False
        torch.set_num_threads(config.train.threads or here.default_threads())
        s = _set_up(config, here, resume=resume, overwrite=overwrite, console=console, show_progress=show_progress)
        try:
            _loop(s, console, show_progress, on_step)
            return _finish(s, console)
        finally:
            s.engine.close()  # DistributedDataParallel must go before its process group closes


def _loop(s: _Session, console: Console, show_progress: bool, on_step: Callable[[LoopState], None] | None) -> None:
    """Length-grouped batches → one optimizer step → log, evaluate, checkpoint; until the epochs are done
    or early stopping says so."""
    tcfg, state = s.cfg.train, s.state
    s.model.train()
    with progress_bar(console, show_progress) as progress:
        task = progress.add_task("train", total=s.total_steps, completed=state.step, info="")
        while not state.done and state.epoch < s.epochs:
            batches = epoch_batches(s.train_set.lengths, tcfg, state.epoch)
            while state.batch < len(batches) and not state.done:
                info = _step(s, batches[state.batch : state.batch + tcfg.grad_accum_steps])
                progress.update(task, completed=state.step, info=info)
                evaluated = bool(tcfg.eval_every_steps) and state.step % tcfg.eval_every_steps == 0
                if evaluated:
                    _evaluate_and_track(s, progress.console)
                if evaluated or state.step % tcfg.checkpoint_every_steps == 0:
                    _checkpoint(s)
                if on_step is not None:
                    on_step(state)
            if not state.done:
                state.epoch, state.batch = state.epoch + 1, 0
                # With keep: last, the end of training is what the run keeps, so it is judged even when it
                # falls between two step-based evaluations.
                if not tcfg.eval_every_steps or (
                    tcfg.keep == "last" and state.epoch == s.epochs and state.step % tcfg.eval_every_steps
                ):
                    _evaluate_and_track(s, progress.console)
                _checkpoint(s)


def staging_dir(target: Path | str) -> Path:
    """Where a run for ``target`` is written until it is complete."""
    target = Path(target)
    return target.with_name(target.name + STAGING_SUFFIX)


def auto_epochs(n_train: int, cfg_epochs: int | None, min_samples: int, min_epochs: int, max_epochs: int) -> int:
    """Small datasets need many passes, large ones few. Aim for ~min_samples examples seen, but never
    fewer than min_epochs: on a large dataset a small encoder still gains from the later, low-lr passes."""
    if cfg_epochs is not None:
        return cfg_epochs
    return max(min_epochs, min(max_epochs, math.ceil(min_samples / max(1, n_train))))


# --------------------------------------------------------------------------- set-up


def _set_up(
    config: RunConfig, here: Dist, *, resume: bool, overwrite: bool, console: Console, show_progress: bool
) -> _Session:
    cfg, tcfg = config, config.train
    if tcfg.precision == "fp16" and here.device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a GPU (this run is on the CPU); use bf16 or fp32")
    # Validate everything before writing anything: a bad input must not leave a half-made run behind.
    target = Path(cfg.output.dir)
    run = on_main(here, lambda: _check_output(cfg, target, resume=resume, overwrite=overwrite))
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, seed=tcfg.seed, tokenizer=tokenizer, max_length=cfg.model.max_length)
    # Made once, by rank 0 (a paraphrasing model is slow), for every process.
    extra = on_main(here, lambda: _extra_texts(cfg, run, data, resume, console, show_progress))
    n_examples = len(extra.texts) + len(extra.transfer)
    epochs = auto_epochs(n_examples, tcfg.epochs, tcfg.min_train_samples, tcfg.min_auto_epochs, tcfg.max_auto_epochs)
    steps_per_epoch = math.ceil(math.ceil(n_examples / tcfg.batch_size) / tcfg.grad_accum_steps)
    total_steps = epochs * steps_per_epoch
    # What learns (everything, or an adapter and the head) and the optimizer.
    torch.manual_seed(tcfg.seed)
    model, optimizer = trainable_model(cfg, data.labels, total_steps=total_steps)
    model.to(here.device)  # the optimizer holds the same parameters, now there
    if here.enabled:  # one dropout stream per process (the same on every process would repeat its masks)
        torch.manual_seed(_process_seed(tcfg.seed, here.rank, step=0))
    trainable, total = adapters.trainable_parameter_count(model)
    average = WeightAverage(model, tcfg.ema_decay) if tcfg.ema_decay is not None else None
    console.print(format_audit(data.audit))
    for line in extra.lines:
        console.print(line)
    teacher_texts = [*extra.texts, *extra.transfer]
    soft_targets = _teacher_logits(
        cfg, run, here, teacher_texts, data.labels, resume, console, show_progress, n_labelled=len(extra.texts)
    )

    if here.is_main:
        if not resume:
            _start_run_dir(run, cfg, data)
        extra.save(run.path)
        if soft_targets is not None:
            save_teacher_logits(run.teacher_logits_file, soft_targets, cfg.distill, teacher_texts)
    label_index = {name: i for i, name in enumerate(data.labels)}
    s = _Session(
        here=here,
        engine=Engine(here),
        cfg=cfg,
        target=target,
        run=run,
        tokenizer=tokenizer,
        data=data,
        model=model,
        optimizer=optimizer,
        average=average,
        train_set=encode_training_set(
            cfg,
            tokenizer,
            extra.texts,
            extra.labels,
            data.labels,
            teacher_logits=soft_targets,
            unlabelled_texts=extra.transfer,
        ),
        val_ids=encode_texts(tokenizer, data.validation.texts, cfg.model.max_length),
        val_y=[label_index[y] for y in data.validation.labels],
        epochs=epochs,
        total_steps=total_steps,
        counts={
            "trainable_parameters": trainable,
            "total_parameters": total,
            "labelled_examples": len(data.train),
            "augmented_examples": len(extra.texts) - len(data.train),
            "transfer_examples": len(extra.transfer),
        },
        state=LoopState(),
    )
    if resume:
        processes = _restore(s)
        console.print(f"resuming {run.path} at step {s.state.step}/{total_steps} (epoch {s.state.epoch + 1})")
        if processes != here.world_size:
            console.print(
                f"the interrupted run had {processes} process(es), this one has {here.world_size}: the same "
                "batches and steps, each batch shared out anew; new dropout streams for the processes it "
                "did not have, and a different order of float additions, so the result is close, not identical"
            )
    # Wrapped after the restore: DistributedDataParallel starts every process from rank 0's weights.
    s.engine = build_engine(model, here, tcfg.precision)
    if here.enabled:
        console.print(f"{here.world_size} processes on {here.device.type}, each {torch.get_num_threads()} thread(s)")
    console.print(
        f"training {n_examples} examples, {len(data.labels)} labels, {epochs} epochs, "
        f"{total_steps} steps of {tcfg.batch_size * tcfg.grad_accum_steps}; {cfg.finetune.method} fine-tuning, "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
    )
    return s


def _check_output(config: RunConfig, target: Path, *, resume: bool, overwrite: bool) -> RunDir:
    """The staging folder to write into, once it is clear that nothing but a run would ever be replaced."""
    staging = RunDir(staging_dir(target))
    if resume:
        if not has_checkpoint(staging.checkpoint_dir):
            raise RunDirError(
                f"output.dir: no interrupted run of {target} to resume ({staging.path} has no checkpoint)"
            )
        saved = staging.config_file.read_text(encoding="utf-8") if staging.config_file.exists() else ""
        check_same_config(saved, config, interrupted=f"run in {staging.path}")
    # First what may never be replaced (with or without --overwrite), then what only --overwrite replaces.
    check_replaceable(target, option="output.dir")
    check_replaceable(staging.path, option="output.dir")
    if not resume and not overwrite:
        if _non_empty(staging.path):
            raise RunDirError(
                f"output.dir: {staging.path} holds an interrupted run of {target}; "
                "pass --resume to continue it or --overwrite to start again"
            )
        if _non_empty(target):
            raise RunDirError(f"output.dir: {target} already exists; pass --overwrite to replace it")
    return staging


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_same_config(saved_yaml: str, config: RunConfig, *, interrupted: str) -> None:
    """Refuse to resume ``interrupted`` (e.g. "run in runs/x.partial") under another config than it began with.

    A key the saved config lacks, at any depth, counts as its schema default: a run begun before the key
    existed resumes when the key is still at the default it then had implicitly.
    """
    import yaml

    saved = yaml.safe_load(saved_yaml) or {}
    difference = _first_difference(saved, config, ())
    if difference is not None:
        key, there, now = difference
        raise RunDirError(
            f"{key}: differs from the interrupted {interrupted} ({there!r} there, {now!r} now); "
            "resume with the same config"
        )


def _first_difference(saved: Any, model: BaseModel, path: tuple[str, ...]) -> tuple[str, Any, Any] | None:
    saved = saved if isinstance(saved, dict) else {}
    for name, field in type(model).model_fields.items():
        key = (*path, name)
        if key in RESUME_IGNORED_KEYS:
            continue
        value = getattr(model, name)
        if name not in saved:
            if to_jsonable_python(value) == to_jsonable_python(field.get_default(call_default_factory=True)):
                continue
            return ".".join(key), None, to_jsonable_python(value)
        there = saved[name]
        if isinstance(value, BaseModel) and isinstance(there, dict):
            difference = _first_difference(there, value, key)
            if difference is not None:
                return difference
        elif there != to_jsonable_python(value):
            return ".".join(key), there, to_jsonable_python(value)
    return None


@dataclass
class _ExtraTexts:
    """What the run trains on: the labelled split plus augmented copies (``texts``/``labels``), then the
    transfer texts that only the teacher labels; ``lines`` say what was added, for the console."""

    texts: list[str]
    labels: list[str]
    transfer: list[str]
    augmented: AugmentedCopies | None
    transfer_data: TransferTexts | None
    lines: list[str]

    def save(self, staging: Path) -> None:
        """Keep what was made now (not what was reused) for a resumed run."""
        if self.augmented is not None and not self.augmented.report.get("reused"):
            save_augmented(staging, self.augmented)
        if self.transfer_data is not None and not self.transfer_data.report.get("reused"):
            save_transfer(staging, self.transfer_data)


def _extra_texts(
    cfg: RunConfig, run: RunDir, data: PreparedData, resume: bool, console: Console, show_progress: bool
) -> _ExtraTexts:
    """``data.augment`` and ``distill.transfer_data``, made before the run folder is (re)started; the audit
    records their counts."""
    with progress_bar(console, show_progress, info=False) as progress:
        augmented = augmented_copies(cfg, data, run.path, resume=resume, progress=progress)
        transfer = transfer_texts(cfg, data, run.path, resume=resume, progress=progress)
    lines = []
    texts, labels = list(data.train.texts), list(data.train.labels)
    if augmented is not None:
        texts += augmented.texts
        labels += augmented.labels
        data.audit["augmentation"] = summary(augmented.report)
        kept = ", ".join(f"{op} {tally['kept']:,}" for op, tally in augmented.report["operations"].items())
        reused = " (kept from the interrupted run)" if augmented.report.get("reused") else ""
        lines.append(f"augmented: +{len(augmented.texts):,} copies of the training texts ({kept}){reused}")
        lines.extend(f"[yellow]warning:[/yellow] augmentation: {w}" for w in augmented.report.get("warnings", []))
    if transfer is not None:
        data.audit["transfer_data"] = summary(transfer.report)
        dropped = transfer.report["dropped"]
        lines.append(
            f"transfer data: {len(transfer.texts):,} texts for the teacher to label "
            f"({transfer.report['from_file']:,} from the file, {transfer.report['augmented_copies']:,} augmented; "
            f"dropped {dropped['in_validation_or_test']:,} validation/test texts, {dropped['in_train']:,} "
            f"training texts, {dropped['repeated']:,} repeats; {transfer.report['sampled_out']:,} sampled out)"
            + (" (kept from the interrupted run)" if transfer.report.get("reused") else "")
        )
    return _ExtraTexts(texts, labels, transfer.texts if transfer else [], augmented, transfer, lines)


def _teacher_logits(
    cfg: RunConfig,
    run: RunDir,
    here: Dist,
    texts: list[str],
    labels: list[str],
    resume: bool,
    console: Console,
    show_progress: bool,
    *,
    n_labelled: int,
) -> torch.Tensor | None:
    """Distillation's soft targets: one pass of the teacher per run; a resumed run reuses the kept logits.

    With ``alpha`` 0 the labelled rows learn from their labels alone, so the teacher scores only the
    transfer texts (the first ``n_labelled`` rows stay zeros, never read). On several processes each
    scores its share of the rows and the shares are summed (each row is non-zero on one process only)."""
    if cfg.distill.teacher is None:
        return None
    if resume:
        kept = on_main(here, lambda: load_teacher_logits(run.teacher_logits_file, cfg.distill, texts))
        if kept is not None:
            console.print(f"distillation: reusing the teacher's logits kept in {run.teacher_logits_file}")
            return kept
    needed = list(range(n_labelled, len(texts))) if cfg.distill.alpha == 0 else None
    if here.enabled:
        needed = shard(list(range(len(texts))) if needed is None else needed, here)
    logits = teacher_pass(cfg, texts, labels, console, show_progress, needed=needed, device=here.device)
    return sum_tensor(logits, here)


def _start_run_dir(run: RunDir, cfg: RunConfig, data: PreparedData) -> None:
    # A leftover of an earlier interrupted run (check_replaceable has vouched for it): start afresh.
    if run.path.exists():
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True)
    atomic_write_text(run.config_file, cfg.to_yaml())
    atomic_write_json(run.labels_file, data.labels)
    atomic_write_json(run.audit_file, data.audit)


def _restore(s: _Session) -> int:
    """Continue from the checkpoint (every process reads it); returns how many processes wrote it."""
    saved = load_checkpoint(s.run.checkpoint_dir, s.model, s.optimizer, rank=s.here.rank, device=s.here.device)
    s.state = saved.loop_state
    adapters.load_training_state(s.model, saved.method_state)
    if s.average is not None:
        s.average.load_state_dict(saved.weight_average)
    if not saved.rng_restored:  # a process the interrupted run did not have
        torch.manual_seed(_process_seed(s.cfg.train.seed, s.here.rank, step=s.state.step))
    if s.here.is_main:
        _truncate_log(s.run, s.state.step)
    return saved.processes


def _process_seed(seed: int, rank: int, *, step: int) -> int:
    """A dropout seed per process (and per resume point), apart from the model's initialisation seed."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 1) % (2**63)


# --------------------------------------------------------------------------- the loop's pieces


def _step(s: _Session, group: list[list[int]]) -> str:
    """One optimizer step at the scheduled learning rate; returns the progress bar's text."""
    started = time.perf_counter()
    state, tcfg = s.state, s.cfg.train
    warmup_steps = round(tcfg.warmup_ratio * s.total_steps)
    apply_schedule(
        s.optimizer, state.step, total_steps=s.total_steps, warmup_steps=warmup_steps, schedule=tcfg.schedule
    )
    loss = train_step(s.model, s.optimizer, group, s.train_set, tcfg, state.step, s.average, s.engine)
    state.step += 1
    state.batch += len(group)
    state.samples += sum(len(b) for b in group)
    state.train_seconds += time.perf_counter() - started
    speed = state.samples / max(state.train_seconds, 1e-9)
    lr = s.optimizer.param_groups[0]["lr"]
    if state.step % LOG_EVERY_STEPS == 0 and s.here.is_main:
        record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr, "samples_per_s": speed}
        _append_log(s.run, record)
    return f"loss {loss:.4f}  lr {lr:.2e}  {speed:.1f} samples/s"


def _evaluate_and_track(s: _Session, console: Console) -> None:
    """Score the validation split; keep the model when it is the best so far (or always, with keep: last);
    decide on early stopping."""
    state, tcfg = s.state, s.cfg.train
    # With a weight average, it is the average that is judged and kept; training goes on from the live weights.
    with s.average.applied() if s.average is not None else nullcontext():
        metrics = _evaluate(s)
        score = metrics[tcfg.metric]
        improved = state.best is None or score > state.best
        if improved:
            state.best, state.best_step, state.bad_evals = score, state.step, 0
        else:
            state.bad_evals += 1
        if (improved or tcfg.keep == "last") and s.here.is_main:
            _save_model(s.run, s.cfg, s.model, s.tokenizer, s.data.labels)
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "eval": tcfg.metric,
        "value": score,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "improved": improved,
    }
    if s.here.is_main:
        _append_log(s.run, record)
    saved = " (best, saved)" if improved else " (saved: keep last)" if tcfg.keep == "last" else ""
    console.print(f"step {state.step}: validation {tcfg.metric} {score:.2f}{saved}")
    patience = tcfg.early_stopping_patience
    if patience is not None and state.bad_evals >= patience:
        state.done = True
        console.print(f"early stopping: no improvement in {patience} evaluations")


def _checkpoint(s: _Session) -> None:
    """Rank 0 writes the weights and optimizer (the same on every process) and every process's RNG state."""
    rng_states = gather_objects(rng_state(s.here.device), s.here)
    if not s.here.is_main:
        return
    weight_average = s.average.state_dict() if s.average is not None else None
    method_state = adapters.training_state(s.model)
    save_checkpoint(s.run.checkpoint_dir, s.model, s.optimizer, s.state, method_state, weight_average, rng_states)


def _evaluate(s: _Session) -> dict[str, Any]:
    """Validation metrics; each process predicts its share, and every process gets all the predictions."""
    ids = shard(s.val_ids, s.here)
    logits = predict_logits(s.model, ids, pad_id=s.train_set.pad_id, batch_size=s.cfg.train.eval_batch_size)
    predictions = unshard(logits.argmax(axis=-1).tolist(), s.here)
    return classification_metrics(s.val_y, predictions, s.data.labels)


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


def _append_log(run: RunDir, record: dict[str, Any]) -> None:
    with run.train_log_file.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(run: RunDir, last_step: int) -> None:
    """After a resume, forget the log lines written after the checkpoint (they will be written again),
    and a last line torn by a crash mid-append (disk full, power loss)."""
    if not run.train_log_file.exists():
        return
    kept = []
    # Only "\n" ends a record (str.splitlines would also split at U+2028 & co.); a torn line may end
    # inside a multi-byte character, hence the lenient decoding.
    for line in run.train_log_file.read_bytes().decode("utf-8", errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(run.train_log_file, "".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------- finishing


def _finish(s: _Session, console: Console) -> TrainResult:
    """Evaluate the kept model (best or last: ``train.keep``) exactly as later stages will load it, then swap
    the run into place (rank 0, while the others wait for its metrics)."""
    return TrainResult(run_dir=s.target, metrics=on_main(s.here, lambda: _finish_run(s, console)))


def _finish_run(s: _Session, console: Console) -> dict[str, Any]:
    run, cfg, state, label_names = s.run, s.cfg, s.state, s.data.labels
    if cfg.finetune.merge:
        _write_merged_model(run, s.tokenizer)
    model, tokenizer = load_run_classifier(run)
    model.to(s.here.device)
    pad_id = tokenizer.pad_token_id or 0
    label_index = {name: i for i, name in enumerate(label_names)}
    bs, max_len = cfg.train.eval_batch_size, cfg.model.max_length
    metrics: dict[str, Any] = {}
    scored: dict[str, tuple[Any, list[int]]] = {}
    for split, texts in {"validation": s.data.validation, "test": s.data.test}.items():
        if texts is None or len(texts) == 0:
            continue
        ids = encode_texts(tokenizer, texts.texts, max_len)
        logits = predict_logits(model, ids, pad_id=pad_id, batch_size=bs)
        truth = [label_index[y] for y in texts.labels]
        metrics[split] = classification_metrics(truth, logits.argmax(axis=-1).tolist(), label_names)
        scored[split] = (logits, truth)
    if cfg.train.calibrate and (calibration := _calibrate(run, scored, console)) is not None:
        metrics["calibration"] = calibration
    metrics["train"] = {
        "examples": len(s.train_set.ids),
        "steps": state.step,
        "epochs_completed": state.epoch,
        "samples_per_second": round(state.samples / max(state.train_seconds, 1e-9), 2),
        "train_seconds": round(state.train_seconds, 1),
        "best_step": state.best_step,
        f"best_validation_{cfg.train.metric}": state.best,
        "kept": cfg.train.keep,
        "kept_step": state.best_step if cfg.train.keep == "best" else state.step,
        "stopped_early": state.done,
        **s.counts,
    }
    atomic_write_json(run.metrics_file, metrics)
    shown = "test" if "test" in metrics else "validation"
    plot_confusion_matrix(
        metrics[shown]["confusion_matrix"], label_names, run.confusion_png, f"{shown} confusion matrix"
    )
    _publish(run.path, s.target)
    for split in ("validation", "test"):
        if split in metrics:
            console.print(
                f"{split}: accuracy {metrics[split]['accuracy']:.2f}  macro-F1 {metrics[split]['macro_f1']:.2f}  "
                f"(n={metrics[split]['n']})"
            )
    console.print(f"run directory: {s.target}")
    return metrics


def _calibrate(run: RunDir, scored: dict[str, tuple[Any, list[int]]], console: Console) -> dict[str, Any] | None:
    """Fit the temperature on the validation logits just computed (no extra pass), write calibration.json
    and the reliability diagram (of the test split when there is one: texts the fit never saw); return
    metrics.json's section. A validation split that cannot be fitted on leaves the run uncalibrated."""
    if "validation" not in scored:
        console.print("calibration skipped: no validation split to fit the temperature on")
        return None
    logits, truth = scored["validation"]
    try:
        calibration = fit_calibration(logits, truth, {"data": "validation split"})
    except DataError as exc:
        console.print(f"calibration skipped: {exc}")
        return None
    save_calibration(run.path, calibration)
    section: dict[str, Any] = {
        "temperature": calibration.temperature,
        "validation": {"before": calibration.before, "after": calibration.after},
    }
    if "test" in scored:
        section["test"] = before_after(*scored["test"], calibration.temperature)
    shown = "test" if "test" in scored else "validation"
    plot_reliability(
        *scored[shown], calibration.temperature, run.calibration_png, f"{shown} reliability (T fitted on validation)"
    )
    after = section[shown]["after"]
    console.print(
        f"calibration: temperature {calibration.temperature:.3f}; {shown} ECE "
        f"{section[shown]['before']['ece']:.4f} → {after['ece']:.4f}, NLL "
        f"{section[shown]['before']['nll']:.4f} → {after['nll']:.4f}"
    )
    return section


def _write_merged_model(run: RunDir, tokenizer: Any) -> None:
    """The kept adapter folded into the base weights: a plain HF model, as fast as the base."""
    adapted, _ = load_run_classifier(run, prefer="adapter")
    merged = adapters.merge_adapter(adapted)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_replace_dir(run.model_dir, write)


def _publish(staging: Path, target: Path) -> None:
    """Swap the finished run in for ``target`` (one rename, then the old run is dropped), then drop its
    resume state. Until the swap, a kill leaves the earlier run whole and the checkpoint to resume from."""
    check_replaceable(target, option="output.dir")  # whatever is there now, not when the run started
    atomic_replace_dir(target, lambda folder: os.replace(staging, folder))
    shutil.rmtree(RunDir(target).checkpoint_dir.parent, ignore_errors=True)
