"""`tuneforge optimize`: build cheaper variants of a trained run, measure them, keep the best.

Variants (each is itself a run directory under ``OUT/variants/<name>/``):

    torch-fp32           the run's model as trained (the baseline every ratio is against)
    torch-int8           PyTorch dynamic int8 (quantized as it loads)
    onnx-fp32            ONNX export, run by ONNX Runtime
    onnx-int8            ONNX Runtime dynamic int8 (per-channel signed weights)
    onnx-int8-static     ONNX Runtime static int8, calibrated on training texts
    pruned               least important heads and FFN neurons removed, then distilled from the run
    pruned-onnx-int8     the pruned model, exported and int8-quantized
    distilled            half the layers, initialised from the run's own layers, distilled from it
    distilled-onnx-int8  the student, exported and int8-quantized
    trimmed              the vocabulary cut to the pieces the training texts (and --vocab-sample) use
    trimmed-onnx-int8    the trimmed model, exported and int8-quantized

Every variant is scored on the run's validation data in this one process (accuracy, macro-F1,
batch-1 latency, batch-32 throughput, size on disk, peak memory); the best within the accuracy
budget becomes ``OUT`` itself, a run directory that ``predict``, ``evaluate`` and ``serve`` load.
Each variant fits its own temperature on those validation logits (its ``calibration.json``): an int8
or distilled model is not confident where its source was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from tuneforge.config import RunConfig, validate_config
from tuneforge.data import LabelledTexts, prepare_data, read_eval_file
from tuneforge.data.batching import encode_texts
from tuneforge.errors import ConfigError, DataError, ModelError, RunDirError, TuneforgeError
from tuneforge.files import atomic_replace_dir, atomic_write_json, atomic_write_text
from tuneforge.infer.calibration import fit_calibration, load_calibration, plot_reliability, save_calibration
from tuneforge.models.onnx_runtime import OnnxClassifier
from tuneforge.models.quantized import quantize_torch_dynamic
from tuneforge.models.runs import TorchClassifier, load_run_classifier
from tuneforge.optimize.measure import (
    Measurement,
    folder_size_mb,
    markdown_table,
    measure,
    paired_drop,
    pick_variant,
    plot_frontier,
    reset_peak_rss,
)
from tuneforge.pretrained import quiet_transformers
from tuneforge.rundir import ONNX_DIR, ONNX_FILE, RunDir, check_replaceable, open_run_dir

VARIANTS = (
    "torch-fp32",
    "torch-int8",
    "onnx-fp32",
    "onnx-int8",
    "onnx-int8-static",
    "pruned",
    "pruned-onnx-int8",
    "distilled",
    "distilled-onnx-int8",
    "trimmed",
    "trimmed-onnx-int8",
)
BASELINE = "torch-fp32"
# Variants made from the run's training texts (static calibration, vocabulary, importance scores,
# distillation).
NEEDS_TRAINING_DATA = tuple(
    v for v in VARIANTS if v == "onnx-int8-static" or v.startswith(("pruned", "distilled", "trimmed"))
)
# The model each derived variant starts from (a torch model and its tokenizer), by name prefix.
DERIVED_BASES = ("trimmed", "pruned", "distilled")
COPIED_FILES = ("labels.json", "audit.json")
CALIBRATION_TEXTS = 256
IMPORTANCE_TEXTS = 512


@dataclass
class OptimizeOptions:
    max_drop: float = 1.0
    target: str = "latency"
    variants: tuple[str, ...] | None = None  # None: all (those the run's data still allows)
    prune_heads: float = 0.25
    prune_ffn: float = 0.5
    recovery_epochs: int = 2
    student_layers: int | None = None  # None: half the teacher's layers
    distill_epochs: int | None = None  # None: the run's own epoch rule
    threads: int | None = None
    data_file: Path | None = None  # labelled texts to measure on; None: the run's validation split
    vocab_sample: Path | None = None  # extra texts whose pieces trimmed variants keep (e.g. a language sample)


@dataclass
class OptimizeResult:
    out_dir: Path
    chosen: str
    measurements: list[Measurement]
    rejected: list[str]


def check_variants(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    if BASELINE not in names:
        names = (BASELINE, *names)
    return tuple(dict.fromkeys(names))


@dataclass
class _Data:
    validation: LabelledTexts
    train: LabelledTexts | None  # None: not needed, or --data given and the run's data files are gone


def _missing_run_files(cfg: RunConfig) -> list[Path]:
    """The run's data files (those a retraining reads) that no longer exist."""
    return [path for path in (cfg.data.train, cfg.data.validation) if path is not None and not path.is_file()]


def _measurement_data(cfg: RunConfig, run: RunDir, data_file: Path | None, *, need_train: bool) -> _Data:
    """The texts variants are measured on: ``data_file`` if given, else the run's own validation split
    (re-made from its config and seed); and the run's training texts where a variant needs them."""
    labels = run.labels()
    validation = read_eval_file(data_file, cfg.data, labels) if data_file is not None else None
    if validation is not None and (not need_train or _missing_run_files(cfg)):
        return _Data(validation, None)
    try:
        # The test file plays no part here; a run whose test file is gone still has its data.
        prepared = prepare_data(cfg.data.model_copy(update={"test": None}), seed=cfg.train.seed)
    except TuneforgeError as exc:
        if validation is not None:
            raise
        raise RunDirError(
            f"{run.path}: no validation data to measure variants on ({exc}); pass --data FILE with labelled texts"
        ) from None
    return _Data(validation if validation is not None else prepared.validation, prepared.train)


def _runnable_variants(
    requested: tuple[str, ...] | None, cfg: RunConfig, data_file: Path | None, console: Console
) -> tuple[str, ...]:
    """The variants to build. With ``--data`` and the run's training file gone, the variants made from
    training texts cannot be built: skipped with a message by default, an error when asked for by name."""
    names = check_variants(requested if requested is not None else VARIANTS)
    needing = [name for name in names if name in NEEDS_TRAINING_DATA]
    missing = _missing_run_files(cfg) if data_file is not None and needing else []
    if not missing:
        return names
    gone = ", ".join(str(path) for path in missing)
    if requested is not None:
        raise RunDirError(
            f"--variants: {', '.join(needing)} need the run's training data, and {gone} no longer exists; "
            "restore it or leave those variants out"
        )
    console.print(f"skipping {', '.join(needing)}: they need the run's training data, and {gone} no longer exists")
    return tuple(name for name in names if name not in NEEDS_TRAINING_DATA)


def _is_trimmed(name: str) -> bool:
    return name.startswith("trimmed")


def _read_vocab_sample(path: Path | None) -> list[str]:
    """The texts of ``--vocab-sample`` (a .txt file has one per line), read before any variant is built."""
    if path is None:
        return []
    from tuneforge.infer.stream import read_texts

    try:
        return read_texts(Path(path))
    except TuneforgeError as exc:
        raise type(exc)(f"--vocab-sample: {exc}") from None


def _trimmable_variants(
    names: tuple[str, ...], tokenizer: Any, *, requested: bool, console: Console
) -> tuple[str, ...]:
    """``names`` less the trimmed variants where the run's tokenizer cannot be trimmed (BPE): skipped with
    a message by default, an error when asked for by name."""
    from tuneforge.optimize.trim import check_trimmable

    trimmed = [name for name in names if _is_trimmed(name)]
    if not trimmed:
        return names
    try:
        check_trimmable(tokenizer)
    except ModelError as exc:
        if requested:
            raise ModelError(f"--variants: {', '.join(trimmed)}: {exc}; leave them out") from None
        console.print(f"skipping {', '.join(trimmed)}: {exc}")
        return tuple(name for name in names if not _is_trimmed(name))
    return names


def _write_run(
    folder: Path, source: RunDir, cfg: RunConfig, variant: dict[str, Any], write_model: Callable[[Path], None]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (source.path / name).exists():
            shutil.copy2(source.path / name, folder / name)
    # The source's config as read (paths resolved), not copied: a relative path in it would name a
    # file next to the source run, not next to the variant.
    atomic_write_text(RunDir(folder).config_file, cfg.to_yaml())
    write_model(folder)
    atomic_write_json(folder / "variant.json", variant)


def _save_hf(model: torch.nn.Module, tokenizer: Any) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")

    return write


class _Builder:
    """Builds and measures variants into ``work`` (the staging copy of OUT)."""

    def __init__(
        self,
        source: RunDir,
        cfg: RunConfig,
        data: _Data,
        work: Path,
        options: OptimizeOptions,
        console: Console,
        vocab_sample: list[str] | None = None,
    ) -> None:
        self.source, self.cfg, self.work, self.options, self.console = source, cfg, work, options, console
        self.vocab_sample = vocab_sample or []
        self.model, self.tokenizer = load_run_classifier(source, prefer="model" if source.has_full_model else "adapter")
        if not source.has_full_model:
            from tuneforge.adapters import merge_adapter

            self.model = merge_adapter(self.model)  # ConfigError for methods that cannot merge
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.labels = source.labels()
        self.data = data
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted(set(self.data.validation.labels) - set(index))
        if unknown:
            raise RunDirError(f"validation data has labels the run does not know: {unknown[:5]}")
        max_length = cfg.model.max_length
        self.val_ids = encode_texts(self.tokenizer, self.data.validation.texts, max_length)
        self.val_y = [index[y] for y in self.data.validation.labels]
        # A trimmed variant numbers its pieces anew: its validation ids come from its own tokenizer.
        self._encoded: list[tuple[Any, list[list[int]], int]] = [(self.tokenizer, self.val_ids, self.pad_id)]
        self.measurements: list[Measurement] = []
        self.right: dict[str, np.ndarray] = {}  # per variant: was it right on each validation text

    def validation_ids(self, tokenizer: Any) -> tuple[list[list[int]], int]:
        """The validation texts as ``tokenizer`` encodes them, and its padding id."""
        for known, ids, pad_id in self._encoded:
            if known is tokenizer:
                return ids, pad_id
        ids = encode_texts(tokenizer, self.data.validation.texts, self.cfg.model.max_length)
        pad_id = tokenizer.pad_token_id or 0
        self._encoded.append((tokenizer, ids, pad_id))
        return ids, pad_id

    def variant_dir(self, name: str) -> Path:
        return self.work / "variants" / name

    def _measure(
        self, name: str, classifier: Any, tokenizer: Any, size_mb: float, parameters: int | None = None
    ) -> None:
        self.console.print(f"measuring {name} ...")
        val_ids, pad_id = self.validation_ids(tokenizer)
        scored: list[Any] = []
        result = measure(
            name,
            classifier,
            val_ids,
            self.val_y,
            self.labels,
            pad_id=pad_id,
            size_mb=size_mb,
            parameters=parameters,
            on_logits=scored.append,
        )
        # After the measurement, so that the fit and the plot count in no variant's time or memory.
        calibrated = self._calibrate(name, scored[0])
        self.right[name] = np.asarray(scored[0]).argmax(axis=-1) == np.asarray(self.val_y)
        self.measurements.append(result)
        info = json.loads((self.variant_dir(name) / "variant.json").read_text())
        info["validation"] = result.to_dict()
        if calibrated:
            info["calibration"] = calibrated
        atomic_write_json(self.variant_dir(name) / "variant.json", info)
        shown = f", T {calibrated['temperature']:.3f}" if calibrated else ""
        self.console.print(
            f"  {name}: accuracy {result.accuracy:.2f}, p50 {result.latency_p50_ms:.1f} ms, "
            f"{result.throughput_bs32:.0f} samples/s, {result.size_mb:.1f} MB{shown}"
        )

    def _calibrate(self, name: str, logits: Any) -> dict[str, Any]:
        """The variant's own temperature, fitted on the validation logits it was just scored on, written
        into its run directory; its summary for variant.json ({} where the texts cannot be fitted on)."""
        source = self.options.data_file or "the run's validation split"
        try:
            calibration = fit_calibration(logits, self.val_y, {"data": str(source), "variant": name})
        except DataError as exc:
            self.console.print(f"  {name}: not calibrated: {exc}")
            return {}
        folder = self.variant_dir(name)
        save_calibration(folder, calibration)
        plot_reliability(
            logits, self.val_y, calibration.temperature, RunDir(folder).calibration_png, f"{name}: reliability"
        )
        return {"temperature": calibration.temperature, "before": calibration.before, "after": calibration.after}

    # --- PyTorch variants -------------------------------------------------------------------------

    def torch_variant(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        quantize: bool = False,
        extra: dict | None = None,
    ) -> None:
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        folder = self.variant_dir(name)
        info = {"name": name, "form": "model", "source_run": str(self.source.path), **(extra or {})}
        if quantize:
            info["quantize"] = "torch-dynamic-int8"
        _write_run(folder, self.source, self.cfg, info, _save_hf(model, tokenizer))
        reset_peak_rss()
        runnable = quantize_torch_dynamic(model) if quantize else model
        # int8 weights are a quarter of fp32, but stored fp32 (quantized at load): report what is on disk.
        size = folder_size_mb(folder / "model")
        parameters = sum(p.numel() for p in model.parameters())
        self._measure(name, TorchClassifier(runnable), tokenizer, size, parameters)

    def onnx_variant(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        quantize: str | None,
        extra: dict | None = None,
    ) -> None:
        from tuneforge.optimize.export import export_onnx, parity
        from tuneforge.optimize.quantize import quantize_onnx_dynamic, quantize_onnx_static

        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        val_ids, pad_id = self.validation_ids(tokenizer)
        folder = self.variant_dir(name)
        info = {"name": name, "form": "onnx", "source_run": str(self.source.path), "quantize": quantize}
        info.update(extra or {})

        def write(run_folder: Path) -> None:
            target = run_folder / ONNX_DIR / ONNX_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            if quantize is None:
                export_onnx(model, target)
                info["parity_max_abs_diff"] = parity(model, target, val_ids[:256], pad_id)
            else:
                fp32 = run_folder / ONNX_DIR / "fp32.onnx"
                export_onnx(model, fp32)
                if quantize == "dynamic":
                    quantize_onnx_dynamic(fp32, target)
                else:
                    texts = self.train_texts().texts[:4096]
                    calibration = encode_texts(tokenizer, texts, self.cfg.model.max_length)
                    quantize_onnx_static(fp32, target, calibration, pad_id, max_samples=CALIBRATION_TEXTS)
                fp32.unlink()
            tokenizer.save_pretrained(run_folder / ONNX_DIR)

        _write_run(folder, self.source, self.cfg, info, write)
        reset_peak_rss()
        classifier = OnnxClassifier(folder / ONNX_DIR / ONNX_FILE, threads=self.options.threads)
        self._measure(name, classifier, tokenizer, folder_size_mb(folder / ONNX_DIR / ONNX_FILE))

    # --- trained variants -------------------------------------------------------------------------

    def _train_from(self, init_folder: Path, out: Path, epochs: int | None) -> torch.nn.Module:
        """Train the model in ``init_folder`` on the run's data, distilling from the run itself."""
        from tuneforge.train.loop import train

        raw = self.cfg.model_dump(mode="json")
        raw["model"]["name"] = str(init_folder)
        raw["finetune"] = {"method": "full"}
        raw["distill"] = {**raw.get("distill", {}), "teacher": str(self.source.path)}
        raw["data"]["test"] = None  # the variant is measured here, not on the run's test file
        raw["train"]["epochs"] = epochs
        raw["train"]["learning_rate"] = self.cfg.train.learning_rate if self.cfg.finetune.method == "full" else None
        raw["output"] = {"dir": str(out)}
        result = train(validate_config(raw), overwrite=True, console=self.console, show_progress=False)
        model, _ = load_run_classifier(RunDir(result.run_dir), prefer="model")
        return model.eval()

    def train_texts(self) -> LabelledTexts:
        if self.data.train is None:  # _runnable_variants leaves out every variant that would get here
            raise RunDirError(f"{self.source.path}: the run's training data is not available")
        return self.data.train

    def derived(self, base: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
        """The model, tokenizer and variant.json extras the variants named after ``base`` are made from."""
        if base == "base":
            return self.model, self.tokenizer, {}
        if base == "trimmed":
            return self.trimmed()
        return getattr(self, base)(), self.tokenizer, {}

    def trimmed(self) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
        import copy

        from tuneforge.optimize.trim import trim_vocabulary

        # Validation texts are left out on purpose: they stand for texts the model has not seen, so
        # their accuracy shows what the pieces dropped cost.
        texts = [*self.train_texts().texts, *self.vocab_sample]
        model, tokenizer, report = trim_vocabulary(copy.deepcopy(self.model), self.tokenizer, texts)
        self.console.print(
            f"trimming the vocabulary to the pieces {len(texts)} texts use: "
            f"{report.vocab_before} → {report.vocab_after} pieces, "
            f"{report.parameters_before / 1e6:.1f}M → {report.parameters_after / 1e6:.1f}M parameters"
        )
        extra: dict[str, Any] = {"trim": report.to_dict()}
        if self.options.vocab_sample is not None:
            extra["vocab_sample"] = str(self.options.vocab_sample)
        return model.eval(), tokenizer, extra

    def pruned(self) -> torch.nn.Module:
        import copy

        from tuneforge.optimize.prune import importance, prune

        self.console.print(
            f"pruning {self.options.prune_heads:.0%} of heads and {self.options.prune_ffn:.0%} of FFN neurons"
        )
        model = copy.deepcopy(self.model)
        index = {label: i for i, label in enumerate(self.labels)}
        train = self.train_texts()
        texts, labels = train.texts[:IMPORTANCE_TEXTS], train.labels[:IMPORTANCE_TEXTS]
        encoded = encode_texts(self.tokenizer, texts, self.cfg.model.max_length)
        head_scores, ffn_scores = importance(model, encoded, [index[y] for y in labels], pad_id=self.pad_id)
        prune(
            model,
            head_fraction=self.options.prune_heads,
            ffn_fraction=self.options.prune_ffn,
            head_scores=head_scores,
            ffn_scores=ffn_scores,
        )
        init = self.work / "scratch" / "pruned-init"
        model.save_pretrained(init)
        self.tokenizer.save_pretrained(init)
        return self._train_from(init, self.work / "scratch" / "pruned-run", self.options.recovery_epochs)

    def distilled(self) -> torch.nn.Module:
        from tuneforge.optimize.distill import make_student

        layers = self.options.student_layers or max(1, self.model.config.num_hidden_layers // 2)
        self.console.print(f"distilling a {layers}-layer student from the {self.model.config.num_hidden_layers}")
        student = make_student(self.model, layers)
        init = self.work / "scratch" / "student-init"
        student.save_pretrained(init)
        self.tokenizer.save_pretrained(init)
        return self._train_from(init, self.work / "scratch" / "student-run", self.options.distill_epochs)


def _drop_warning(builder: _Builder, chosen: str, max_drop: float) -> str | None:
    """Why the choice may not hold beyond the validation texts: the chosen variant's drop against the
    baseline, paired on the same texts, may exceed the budget at 95% confidence (a small validation
    split cannot tell a 1-point drop from noise)."""
    if chosen == BASELINE:
        return None
    drop, upper = paired_drop(builder.right[BASELINE], builder.right[chosen])
    if upper <= max_drop:
        return None
    observed = f"{drop:.2f} points below" if drop >= 0 else f"{-drop:.2f} points above"
    return (
        f"{chosen} is {observed} {BASELINE} on {len(builder.val_y)} validation texts, but on so "
        f"few texts its true drop may be up to {upper:.2f} points (95% bound), over --max-drop {max_drop}; "
        "measure on more labelled texts (--data FILE) before relying on the choice"
    )


def optimize_run(
    run_dir: Path | str,
    *,
    out_dir: Path | str | None = None,
    options: OptimizeOptions | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> OptimizeResult:
    """Build, measure and compare the variants of ``run_dir``; write the best as the run directory ``out_dir``."""
    options = options or OptimizeOptions()
    console = console or Console(stderr=True)
    if options.max_drop < 0:
        raise ConfigError(f"--max-drop: must be >= 0, got {options.max_drop}")
    if options.target not in ("latency", "size"):
        raise ConfigError(f"--target: must be latency or size, not {options.target!r}")
    source = open_run_dir(run_dir)
    out = Path(out_dir) if out_dir is not None else source.path.with_name(source.path.name + "-optimized")
    if out.resolve() == source.path.resolve() or source.path.resolve().is_relative_to(out.resolve()):
        raise RunDirError(f"--out: {out} is or holds the source run; choose another folder")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out: {out} already exists; pass --overwrite to replace it")
    check_replaceable(out, option="--out")
    cfg = source.config()
    variants = _runnable_variants(options.variants, cfg, options.data_file, console)
    skipped = [name for name in check_variants(options.variants or VARIANTS) if name not in variants]
    need_train = any(name in NEEDS_TRAINING_DATA for name in variants)
    data = _measurement_data(cfg, source, options.data_file, need_train=need_train)
    trimming = any(_is_trimmed(name) for name in variants)
    if options.vocab_sample is not None and not trimming and options.variants is not None:
        raise ConfigError("--vocab-sample: only the trimmed variants use it; add them to --variants or leave it out")
    vocab_sample = _read_vocab_sample(options.vocab_sample) if trimming else None
    if options.threads:
        torch.set_num_threads(options.threads)
    quiet_transformers()

    result: dict[str, Any] = {}

    def build(work: Path) -> None:
        builder = _Builder(source, cfg, data, work, options, console, vocab_sample)
        names = _trimmable_variants(
            variants, builder.tokenizer, requested=options.variants is not None, console=console
        )
        skipped.extend(name for name in variants if name not in names)
        models: dict[str, tuple[torch.nn.Module, Any, dict[str, Any]]] = {}
        for name in names:
            base = next((prefix for prefix in DERIVED_BASES if name.startswith(prefix)), "base")
            if base not in models:
                models[base] = builder.derived(base)
            model, tokenizer, extra = models[base]
            if name in ("torch-fp32", *DERIVED_BASES):
                builder.torch_variant(name, model, tokenizer, extra=extra)
            elif name == "torch-int8":
                builder.torch_variant(name, model, tokenizer, quantize=True)
            elif name == "onnx-fp32":
                builder.onnx_variant(name, model, tokenizer, quantize=None)
            elif name.endswith("onnx-int8"):
                builder.onnx_variant(name, model, tokenizer, quantize="dynamic", extra=extra)
            elif name == "onnx-int8-static":
                builder.onnx_variant(name, model, tokenizer, quantize="static")
        shutil.rmtree(work / "scratch", ignore_errors=True)
        chosen, rejected = pick_variant(
            builder.measurements, baseline=BASELINE, max_drop=options.max_drop, target=options.target
        )
        # OUT itself is the chosen variant's run directory; the others stay under variants/.
        chosen_dir = builder.variant_dir(chosen.name)
        for item in chosen_dir.iterdir():
            if item.is_dir():
                shutil.copytree(item, work / item.name)
            else:
                shutil.copy2(item, work / item.name)
        baseline = next(m for m in builder.measurements if m.name == BASELINE)
        warning = _drop_warning(builder, chosen.name, options.max_drop)
        metrics: dict[str, Any] = {"validation": chosen.to_dict(), "baseline": baseline.to_dict()}
        if (calibration := load_calibration(work)) is not None:
            metrics["calibration"] = {
                "temperature": calibration.temperature,
                "validation": {"before": calibration.before, "after": calibration.after},
            }
        atomic_write_json(work / "metrics.json", metrics)
        report = {
            "source_run": str(source.path),
            "chosen": chosen.name,
            "max_drop": options.max_drop,
            "target": options.target,
            "validation_examples": len(builder.val_ids),
            "measurements": [m.to_dict() for m in builder.measurements],
            "rejected": rejected,
            "skipped": skipped,
            "warning": warning,
        }
        atomic_write_json(work / "optimize_report.json", report)
        table = markdown_table(builder.measurements, baseline=BASELINE, chosen=chosen.name)
        atomic_write_text(
            work / "optimize_report.md",
            f"# Variants of {source.path}\n\nValidation: {len(builder.val_ids)} texts. Budget: accuracy drop "
            f"<= {options.max_drop} points; target: {options.target}. Chosen: **{chosen.name}**.\n\n{table}\n"
            + (f"\n**Warning**: {warning}\n" if warning else ""),
        )
        plot_frontier(
            builder.measurements, work / "frontier.png", chosen=chosen.name, title=f"variants of {source.path.name}"
        )
        result.update(
            chosen=chosen.name, measurements=builder.measurements, rejected=rejected, table=table, warning=warning
        )

    atomic_replace_dir(out, build)
    console.print(result["table"])
    console.print(f"chosen: {result['chosen']} → {out}")
    if result["warning"]:
        console.print(f"[yellow]warning:[/] {result['warning']}")
    return OptimizeResult(out, result["chosen"], result["measurements"], result["rejected"])


def remeasure(out_dir: Path | str, *, console: Console | None = None) -> list[Measurement]:
    """Measure the variants an earlier ``optimize_run`` saved in ``out_dir/variants`` again, in this process.

    Timings are only comparable within one quiet process; use this to repeat them on a quiet machine.
    """
    from tuneforge.models.runs import load_run_backend

    console = console or Console(stderr=True)
    out = Path(out_dir)
    report = json.loads((out / "optimize_report.json").read_text(encoding="utf-8"))
    names = [m["name"] for m in report["measurements"]]
    source = open_run_dir(report["source_run"])
    cfg = source.config()
    data = _measurement_data(cfg, source, None, need_train=False)
    labels = source.labels()
    index = {label: i for i, label in enumerate(labels)}
    results = []
    for name in names:
        run = open_run_dir(out / "variants" / name)
        reset_peak_rss()
        classifier, tokenizer, form = load_run_backend(run)
        encoded = encode_texts(tokenizer, data.validation.texts, cfg.model.max_length)
        weights = run.onnx_file if form == "onnx" else run.model_dir
        console.print(f"measuring {name} ...")
        results.append(
            measure(
                name,
                classifier,
                encoded,
                [index[y] for y in data.validation.labels],
                labels,
                pad_id=tokenizer.pad_token_id or 0,
                size_mb=folder_size_mb(weights),
            )
        )
    return results
