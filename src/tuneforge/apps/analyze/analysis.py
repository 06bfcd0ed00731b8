"""``analyze(run, data)``: a run's errors on a labelled file, and the file's probable label errors.

Two kinds of file, two sources of out-of-sample probabilities for the label-error finder:

- ``held_out`` (a test or validation file): the run never trained on it, so its own (calibrated)
  probabilities are out-of-sample already;
- ``training`` (the file the run trained on): the run has learned those labels, wrong ones included, so a
  cheap head is cross-validated on its frozen features instead (:mod:`.label_errors`).

``auto`` takes ``training`` when the file is the run's ``data.train``. The error analysis itself (confused
pairs, confident mistakes, calibration per class) always describes the run's own answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from tuneforge.apps.analyze.features import logits_and_features
from tuneforge.apps.analyze.figures import (
    ConfusedPair,
    Mistake,
    confident_mistakes,
    confused_pairs,
    per_class,
    summary,
)
from tuneforge.apps.analyze.label_errors import (
    DEFAULT_FOLDS,
    FILTERS,
    Suspect,
    check_folds,
    cross_validated_probabilities,
    find_label_issues,
    suspects_from,
)
from tuneforge.config import DataConfig
from tuneforge.data.prepare import read_clean_file
from tuneforge.data.readers import LabelledTexts
from tuneforge.errors import DataError
from tuneforge.infer.evaluate import eval_data_config
from tuneforge.infer.predictor import Predictor

MODES = ("auto", "training", "held_out")
_SHOWN = 10


@dataclass(frozen=True)
class AnalyzeOptions:
    """``mode``: see the module; ``folds``/``seed``: the cross-validated head (training mode);
    ``filter_by``: cleanlab's rule for the suspect set; ``top``: confused pairs and mistakes shown;
    ``explain``: the most confident mistakes explained word by word (0: none; needs tuneforge.explain)."""

    mode: str = "auto"
    folds: int = DEFAULT_FOLDS
    seed: int = 0
    filter_by: str = "prune_by_noise_rate"
    top: int = 20
    explain: int = 5
    text_column: str | None = None
    label_column: str | None = None
    encoding: str | None = None
    form: str = "auto"
    threads: int | None = None

    def check(self, name: Callable[[str], str] = str) -> None:
        """Refuses values the analysis cannot use; ``name`` turns a field into what the messages call it (the
        CLI's flags, ``--filter-by``), so the CLI can check before the model loads with its own words."""
        if self.mode not in MODES:
            raise DataError(f"{name('mode')}: unknown {self.mode!r}; one of {', '.join(MODES)}")
        if self.filter_by not in FILTERS:
            raise DataError(f"{name('filter_by')}: unknown {self.filter_by!r}; one of {', '.join(FILTERS)}")
        if self.folds < 2:
            raise DataError(f"{name('folds')}: must be at least 2, got {self.folds}")
        if self.top < 1:
            raise DataError(f"{name('top')}: must be at least 1, got {self.top}")
        if self.explain < 0:
            raise DataError(f"{name('explain')}: must be 0 or more, got {self.explain}")
        if self.threads is not None and self.threads < 1:
            raise DataError(f"{name('threads')}: must be at least 1, got {self.threads}")


@dataclass
class Analysis:
    """Everything the report shows; ``data`` is the file as read (cleaned), ``suspects`` ranked."""

    run: str
    source: str
    mode: str
    folds: int | None
    labels: list[str]
    summary: dict[str, Any]
    pairs: list[ConfusedPair]
    mistakes: list[Mistake]
    classes: list[dict[str, Any]]
    suspects: list[Suspect]
    data: LabelledTexts
    data_config: DataConfig
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the texts of the suspects included, the data not)."""
        return {
            "run": self.run,
            "data": self.source,
            "mode": self.mode,
            "folds": self.folds,
            "summary": self.summary,
            "suspects": len(self.suspects),
            "confused_pairs": [{**asdict(pair), "total": pair.total} for pair in self.pairs],
            "confident_mistakes": [asdict(mistake) for mistake in self.mistakes],
            "per_class": self.classes,
            "notes": self.notes,
        }


def read_analysis_data(path: Path, cfg: DataConfig, labels: list[str]) -> LabelledTexts:
    """The labelled file, cleaned as in training; every label must be one of the run's (all unknown ones
    are named, with their counts: a typo'd or new label shows at once)."""
    data = read_clean_file(path, cfg)
    known = set(labels)
    unknown = Counter(label for label in data.labels if label not in known)
    if unknown:
        shown = ", ".join(f"{label!r} ({count})" for label, count in unknown.most_common(_SHOWN))
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        run_labels = ", ".join(labels[:20]) + (f", ... ({len(labels)} in all)" if len(labels) > 20 else "")
        raise DataError(
            f"{path}: {sum(unknown.values())} rows have labels the run was not trained on: {shown}{more}; "
            f"the run's labels are {run_labels}"
        )
    return data


def resolve_mode(mode: str, data_path: Path, predictor: Predictor) -> str:
    """``auto``: ``training`` when ``data_path`` is the file the run trained on, else ``held_out``."""
    if mode != "auto":
        return mode
    config = predictor.run.config_or_none()
    if config is not None:
        try:
            if Path(config.data.train).resolve() == Path(data_path).resolve():
                return "training"
        except OSError:
            pass
    return "held_out"


def explain_mistakes(predictor: Predictor, mistakes: list[Mistake], count: int) -> tuple[list[Mistake], str | None]:
    """The first ``count`` mistakes with the words that pushed the model to its wrong answer (occlusion),
    where :mod:`tuneforge.explain` is installed; else unchanged, with a note saying why."""
    if count <= 0 or not mistakes:
        return mistakes, None
    try:
        from tuneforge.explain import explain
    except ImportError:
        return mistakes, "explanations: tuneforge.explain is not available in this installation"
    out = []
    for i, mistake in enumerate(mistakes):
        if i < count:
            try:
                found = explain(predictor, mistake.text, method="occlusion", label=mistake.predicted_label)
            except DataError:
                # A text too long to explain in one batch: shown without its words' scores.
                found = None
            if found is not None:
                words = [(word.text, float(score)) for word, score in zip(found.words, found.scores, strict=True)]
                mistake = replace(mistake, explanation=words)
        out.append(mistake)
    return out, None


def analyze(
    run_dir: Path | str,
    data_path: Path | str,
    options: AnalyzeOptions | None = None,
    *,
    show_progress: bool = False,
    console: Console | None = None,
) -> Analysis:
    """Analyse ``run_dir``'s answers on ``data_path`` and find the file's probable label errors."""
    options = options or AnalyzeOptions()
    options.check()
    data_path = Path(data_path)
    predictor = Predictor(run_dir, form=options.form, threads=options.threads, open_set=False)
    cfg = eval_data_config(predictor, data_path, options.text_column, options.label_column, options.encoding)
    data = read_analysis_data(data_path, cfg, predictor.labels)
    names = predictor.labels
    index = {label: i for i, label in enumerate(names)}
    given = np.array([index[label] for label in data.labels], dtype=np.int64)
    mode = resolve_mode(options.mode, data_path, predictor)
    notes: list[str] = []
    folds: int | None = None
    if mode == "training":
        # Checked before the feature pass (minutes), not after it.
        folds = check_folds(given, options.folds, names)
        if folds < options.folds:
            notes.append(
                f"cross-validation with {folds} folds, not {options.folds}: the smallest label has {folds} texts"
            )
    logits, features = logits_and_features(predictor, data.texts, show_progress=show_progress, console=console)
    # Calibrated with the run's temperature (RUN/calibration.json) where it has one.
    probabilities = np.asarray(predictor.probabilities(logits), dtype=np.float64)
    if mode == "training":
        assert folds is not None
        out_of_sample = cross_validated_probabilities(features, given, len(names), folds=folds, seed=options.seed)
        notes.append(
            "training data: the confusions, mistakes and calibration are the run's own answers on texts it was "
            f"trained on (optimistic); the suspects come from a {folds}-fold cross-validated head on its features"
        )
    else:
        out_of_sample = probabilities
    found = find_label_issues(given, out_of_sample, filter_by=options.filter_by)
    suspects = suspects_from(found, out_of_sample, given, names, data.texts, data.rows)
    predicted = probabilities.argmax(axis=1)
    mistakes = confident_mistakes(probabilities, given, names, data.texts, data.rows, top=options.top)
    mistakes, note = explain_mistakes(predictor, mistakes, options.explain)
    if note:
        notes.append(note)
    return Analysis(
        run=str(predictor.run.path),
        source=str(data_path),
        mode=mode,
        folds=folds,
        labels=list(names),
        summary={**summary(probabilities, given, names), "suspects": len(suspects)},
        pairs=confused_pairs(given, predicted, names, top=options.top),
        mistakes=mistakes,
        classes=per_class(probabilities, given, names),
        suspects=suspects,
        data=data,
        data_config=cfg,
        notes=notes,
    )
