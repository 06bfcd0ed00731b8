"""Augment a labelled dataset: generate copies, keep those a model still labels the same, write, report.

``augment_texts`` works on lists (what inline augmentation in training will call); ``augment_file`` reads
a labelled file with the project's readers and writes the originals and the kept copies atomically, with
a JSON report of what each operation produced, kept and dropped (and why) beside the output.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneforge.augment.paraphrase import ENGINES as PARAPHRASE_ENGINES
from tuneforge.augment.paraphrase import Paraphraser, RateColumn
from tuneforge.data.augment import (
    CJK_UNITS,
    DEFAULT_RATE,
    MODEL_FREE_OPERATIONS,
    Candidate,
    NeighbourLookup,
    OperationCounts,
    ParaphraseLookup,
    classes_to_augment,
    generate_candidates,
    is_cjk_text,
    parse_operations,
)
from tuneforge.data.cleaning import clean_text
from tuneforge.data.readers import read_labelled_file
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.files import atomic_write_json, atomic_write_with

OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
ORIGINAL = "original"  # the augmentation column's value on an original row
FILTER_BATCH = 256


@dataclass(frozen=True)
class AugmentOptions:
    """What to generate and what to keep. ``filter_run``: a run directory whose model must still give
    each copy its label with probability >= ``min_probability`` (None: no label filter)."""

    operations: tuple[str, ...] = MODEL_FREE_OPERATIONS
    copies: int = 1
    seed: int = 0
    rate: float = DEFAULT_RATE
    balance_below: int | None = None
    filter_run: Path | None = None
    min_probability: float = 0.5
    neighbour_model: str | None = None  # a run directory or model name; default: filter_run
    neighbours: int = 5
    paraphrase_engine: str = "auto"  # auto (llama_cpp if installed, else transformers), llama_cpp, transformers
    cjk_units: str = "characters"  # what swap, delete and insert act on in CJK text: characters or words (jieba)

    def check(self) -> AugmentOptions:
        operations = parse_operations(self.operations)
        if self.copies < 1:
            raise DataError(f"copies: must be at least 1, got {self.copies}")
        if not 0.0 <= self.min_probability <= 1.0:
            raise DataError(f"min probability: must be between 0 and 1, got {self.min_probability}")
        if self.balance_below is not None and self.balance_below < 1:
            raise DataError(f"balance below: must be at least 1, got {self.balance_below}")
        if "neighbour" in operations and self.neighbour_model is None and self.filter_run is None:
            raise DataError(
                "operation 'neighbour' needs a model's word embeddings: give a neighbour model "
                "(--neighbour-model RUN_OR_MODEL) or a filter run"
            )
        if self.cjk_units not in CJK_UNITS:
            raise DataError(f"CJK units: unknown {self.cjk_units!r}; choose from {', '.join(CJK_UNITS)}")
        if self.paraphrase_engine not in PARAPHRASE_ENGINES:
            raise DataError(
                f"paraphrase engine: unknown {self.paraphrase_engine!r}; choose from {', '.join(PARAPHRASE_ENGINES)}"
            )
        return AugmentOptions(**{**asdict(self), "operations": operations})


@dataclass
class AugmentResult:
    """Originals first, then the kept copies; ``operations`` says which made each row (``original``)."""

    texts: list[str]
    labels: list[str]
    operations: list[str]
    report: dict[str, Any] = field(default_factory=dict)


class LabelFilter:
    """Keeps a copy only if the run's model gives it its label with probability >= ``min_probability``."""

    def __init__(self, run_dir: Path, min_probability: float, *, threads: int | None = None) -> None:
        from tuneforge.infer.predictor import Predictor  # torch: only when a filter is asked for

        self.run_dir = Path(run_dir)
        self.min_probability = min_probability
        # The raw softmax, as when min_probability's default was chosen (not the run's calibrated one).
        self.predictor = Predictor(run_dir, threads=threads, open_set=False, calibrated=False)
        self.index = {label: i for i, label in enumerate(self.predictor.labels)}

    def check_labels(self, labels: Sequence[str]) -> None:
        missing = sorted(set(labels) - set(self.index))
        if missing:
            raise DataError(
                f"filter run {self.run_dir}: its model does not know the data's label(s) "
                f"{', '.join(repr(m) for m in missing[:10])}{' ...' if len(missing) > 10 else ''} "
                f"(it knows {', '.join(self.predictor.labels[:10])}{' ...' if len(self.index) > 10 else ''}); "
                "the filter needs a model trained on these labels"
            )

    def probabilities(
        self, texts: Sequence[str], labels: Sequence[str], on_batch: Callable[[int], None]
    ) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), FILTER_BATCH):
            batch = list(texts[start : start + FILTER_BATCH])
            rows = self.predictor.predict_proba(batch)
            out.extend(
                row[self.index[label]] for row, label in zip(rows, labels[start : start + FILTER_BATCH], strict=True)
            )
            on_batch(len(batch))
        return out


def augment_texts(
    texts: Sequence[str],
    labels: Sequence[str],
    options: AugmentOptions,
    *,
    neighbours: NeighbourLookup | None = None,
    label_filter: LabelFilter | None = None,
    paraphraser: Paraphraser | None = None,
    progress: Progress | None = None,
) -> AugmentResult:
    """Augment in memory. ``neighbours``, ``label_filter`` and ``paraphraser`` are loaded from ``options``
    when not given (the paraphraser only when ``paraphrase`` is among the operations)."""
    options = options.check()
    if not texts:
        raise DataError("augmentation: no texts to augment")
    started = time.perf_counter()
    if label_filter is None and options.filter_run is not None:
        label_filter = LabelFilter(options.filter_run, options.min_probability)
    if label_filter is not None:
        label_filter.check_labels(labels)  # before any work: a wrong run fails at once
    if neighbours is None and "neighbour" in options.operations:
        from tuneforge.augment.neighbours import load_neighbours

        source = options.neighbour_model if options.neighbour_model is not None else options.filter_run
        neighbours = load_neighbours(str(source), k=options.neighbours)
    paraphrases: ParaphraseLookup | None = None
    if "paraphrase" in options.operations:
        if paraphraser is None:
            from tuneforge.augment.paraphrase import load_paraphraser

            paraphraser = load_paraphraser(options.paraphrase_engine, seed=options.seed)
        # One generation pass over the texts that will be augmented, before the others' cheap copies.
        wanted = classes_to_augment(labels, options.balance_below)
        chosen = [text for text, label in zip(texts, labels, strict=True) if label in wanted]
        paraphrases = paraphraser.lookup(chosen, options.copies, progress=progress)

    counts: dict[str, OperationCounts] = {}
    task = progress.add_task("augmenting", total=len(texts)) if progress is not None else None
    candidates = generate_candidates(
        texts,
        labels,
        options.operations,
        copies=options.copies,
        seed=options.seed,
        rate=options.rate,
        neighbours=neighbours,
        paraphrases=paraphrases,
        balance_below=options.balance_below,
        counts=counts,
        cjk_units=options.cjk_units,
        on_text=(lambda: progress.advance(task)) if progress is not None and task is not None else None,
    )
    kept = _filter(candidates, label_filter, counts, progress)
    result = AugmentResult(
        texts=[*texts, *(c.text for c in kept)],
        labels=[*labels, *(c.label for c in kept)],
        operations=[ORIGINAL] * len(texts) + [c.operation for c in kept],
    )
    result.report = _report(texts, labels, kept, counts, options, label_filter, time.perf_counter() - started)
    if paraphrases is not None and paraphraser is not None:
        result.report["paraphrase"] = paraphraser.stats.to_dict()
    return result


def _filter(
    candidates: list[Candidate],
    label_filter: LabelFilter | None,
    counts: dict[str, OperationCounts],
    progress: Progress | None,
) -> list[Candidate]:
    if label_filter is None:
        kept = candidates
    else:
        task = progress.add_task("filtering", total=len(candidates)) if progress is not None else None
        probabilities = label_filter.probabilities(
            [c.text for c in candidates],
            [c.label for c in candidates],
            lambda n: progress.advance(task, n) if progress is not None and task is not None else None,
        )
        kept = []
        for candidate, probability in zip(candidates, probabilities, strict=True):
            if probability >= label_filter.min_probability:
                kept.append(candidate)
            else:
                counts[candidate.operation].dropped["low_probability"] += 1
    for candidate in kept:
        counts[candidate.operation].kept += 1
    return kept


def _report(
    texts: Sequence[str],
    labels: Sequence[str],
    kept: list[Candidate],
    counts: dict[str, OperationCounts],
    options: AugmentOptions,
    label_filter: LabelFilter | None,
    seconds: float,
) -> dict[str, Any]:
    originals = Counter(labels)
    added = Counter(c.label for c in kept)
    augmented_classes = classes_to_augment(labels, options.balance_below)
    return {
        "operations": {name: tally.to_dict() for name, tally in counts.items()},
        "originals": len(texts),
        "augmented": len(kept),
        "rows": len(texts) + len(kept),
        "per_label": {
            label: {
                "original": originals[label],
                "augmented": added[label],
                "was_augmented": label in augmented_classes,
            }
            for label in sorted(originals)
        },
        "options": {
            "operations": list(options.operations),
            "copies": options.copies,
            "seed": options.seed,
            "rate": options.rate,
            "balance_below": options.balance_below,
            "neighbour_model": str(options.neighbour_model or options.filter_run)
            if "neighbour" in options.operations
            else None,
            "neighbours": options.neighbours if "neighbour" in options.operations else None,
            "paraphrase_engine": options.paraphrase_engine if "paraphrase" in options.operations else None,
            "cjk_units": options.cjk_units,
        },
        "filter": None
        if label_filter is None
        else {"run": str(label_filter.run_dir), "min_probability": label_filter.min_probability},
        "seconds": round(seconds, 3),
        "warnings": _warnings(texts, options),
    }


# Swap, delete and insert by characters break Chinese words (most are two characters): on waimai_10k,
# 100 labelled reviews per class, they cost 3.30 points where the same operations on words gained 3.49.
_CHARACTER_OPERATIONS = frozenset({"swap", "delete", "insert"})


def _warnings(texts: Sequence[str], options: AugmentOptions) -> list[str]:
    """What the user should hear about these options on these texts (also printed, not only reported)."""
    warnings = []
    acting = sorted(_CHARACTER_OPERATIONS.intersection(options.operations))
    if options.cjk_units == "characters" and acting:
        cjk = sum(1 for text in texts if is_cjk_text(text))
        if cjk * 2 >= len(texts):
            warnings.append(
                f"{cjk:,} of {len(texts):,} texts are Chinese, Japanese or Korean, and {', '.join(acting)} act on "
                "single characters there, which breaks words; for Chinese, cjk_units: words (the zh extra) "
                "moves whole words (measured on waimai_10k: +3.49 points by words, -3.30 by characters)"
            )
    return warnings


def report_path(out: Path) -> Path:
    """Where the report of ``out`` goes: ``train_aug.csv`` -> ``train_aug.augment.json``."""
    return out.with_name(f"{out.stem}.augment.json")


def augment_file(
    path: Path,
    out: Path,
    options: AugmentOptions,
    *,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    format: str = "auto",
    show_progress: bool = True,
    console: Console | None = None,
) -> AugmentResult:
    """Read ``path``, augment it, write originals + kept copies to ``out`` and the report beside it."""
    path, out = Path(path), Path(out)
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise TuneforgeError(f"--out: unsupported file type {out.suffix or '(none)'}; use {', '.join(OUTPUT_FORMATS)}")
    if path.exists() and out.exists() and out.resolve() == path.resolve():
        raise TuneforgeError(f"--out: {out} is the input file; choose another name")
    options = options.check()
    # Cleaned as training cleans (whitespace, Unicode form) so the operations see words, and rows whose
    # text is empty are dropped, not augmented.
    data = read_labelled_file(
        path, text_column=text_column, label_column=label_column, encoding=encoding, format=format, clean=clean_text
    )
    if not data.texts:
        raise DataError(f"{path}: no texts left after dropping empty ones")
    progress = Progress(
        TextColumn("[bold]{task.description}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not show_progress,
    )
    with progress:
        result = augment_texts(data.texts, data.labels, options, progress=progress)
    result.report = {"input": str(path), "output": str(out), "read": data.read_counts, **result.report}
    atomic_write_with(out, lambda tmp: _write_rows(tmp, fmt, result, text_column, label_column))
    atomic_write_json(report_path(out), result.report)
    return result


def _write_rows(tmp: Path, fmt: str, result: AugmentResult, text_column: str, label_column: str) -> None:
    rows = zip(result.texts, result.labels, result.operations, strict=True)
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        if fmt == "jsonl":
            for text, label, operation in rows:
                record = {text_column: text, label_column: label, "augmentation": operation}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        if fmt == "tsv":
            # As the TSV reader reads: no quoting (cleaned texts hold no tab or line break).
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None)
        else:
            writer = csv.writer(handle)
        writer.writerow([text_column, label_column, "augmentation"])
        try:
            writer.writerows(rows)
        except csv.Error as exc:
            raise DataError(f"cannot write {fmt.upper()}: {exc}; write .csv or .jsonl instead") from None
