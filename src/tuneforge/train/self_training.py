"""Self-training (noisy-student style): label unlabelled texts with a model, keep the labels it is surest
of (``selection: threshold``: those above a probability; ``proportional``: a growing share of the texts,
per label the likeliest), train again from the pretrained model on the labelled and pseudo-labelled
texts, and repeat. With ``agreement``, a text is a candidate only when a second view agrees with the
model: the label of its nearest labelled text (or label centroid) in the pretrained model's sentence
embeddings, whose mistakes are not the fine-tuned model's.

Every round is an ordinary tuneforge run trained by ``loop.train``. The labelled data is split once,
and the split files are what every round reads, so every round trains on the same labelled rows,
picks its best epoch on the same validation split and is tested on the same test split: pseudo labels
never reach validation or test, and the rounds' scores compare like for like.

The rounds live in a work folder beside the target, ``<output.dir>.rounds/``::

    config.yaml                 the user's config (a resumed run must match it)
    train.csv validation.csv test.csv
                                the labelled splits, fixed once (text,label)
    round-0/                    a finished run on train.csv alone (round-0.partial while training)
    round-K-train.csv           train.csv plus round K's pseudo-labelled rows
    round-K-pseudo.json         which model labelled them (a fingerprint) and what was kept
    round-K/                    a finished run on round-K-train.csv
    self_training.json          the rounds so far

The last round (``publish: last``, the default) or the one that scores best on validation
(``publish: best``; ``train.metric``, ties to the later round) is published as ``output.dir`` with
``self_training.json`` beside its model, the user's config as its config.yaml, and the texts its round
added in ``pseudo_labels.csv`` (text, pseudo label, the labelling model's probability of it: what the
model taught itself, to read or audit). The work folder is then deleted: every round's scores are kept
in self_training.json, and a kept model per round would multiply a run's disk use by ``rounds + 1``.

Resuming (``resume=True``) keeps every finished round, resumes an interrupted one from its
checkpoint, and reuses a round's pseudo labels only while the model that made them is unchanged
(its fingerprint): if an earlier round had to be trained again, the later rounds are redone, so a
round never trains on labels another model made.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import shutil
import statistics
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from tuneforge.config import RunConfig, SelfTrainingConfig
from tuneforge.data import normalise_for_matching, prepare_data
from tuneforge.errors import ConfigError, RunDirError, TuneforgeError
from tuneforge.files import atomic_replace_dir, atomic_write_json, atomic_write_text
from tuneforge.infer.predictor import Predictor
from tuneforge.models.loading import load_tokenizer, sentence_embeddings
from tuneforge.rundir import RunDir, check_replaceable, is_run_dir, open_run_dir
from tuneforge.train import loop
from tuneforge.train.checkpoint import has_checkpoint
from tuneforge.train.step import progress_bar
from tuneforge.train.unlabelled import read_unlabelled_texts

WORK_SUFFIX = ".rounds"
REPORT_FILE = "self_training.json"
#: In the published run: the texts its round added with their pseudo labels, for a user to audit.
PSEUDO_LABELS_FILE = "pseudo_labels.csv"
_TEACHER_KEY = "train.semi_supervised.teacher"
_PREDICT_CHUNK = 256
# What a work folder may hold: anything else in it means it is not ours, and --overwrite must not delete it.
_WORK_FILES = ("config.yaml", "train.csv", "validation.csv", "test.csv", REPORT_FILE)


@dataclass(frozen=True)
class PseudoLabels:
    """The pseudo-labelled texts a round adds, with the counts that explain the selection."""

    texts: list[str]
    labels: list[str]
    probabilities: list[float]
    confident: dict[str, int] = field(default_factory=dict)  # per label, before the cap (threshold selection)
    cap: int = 0  # the per-label cap that was applied (threshold selection)
    excluded: int = 0  # unlabelled texts skipped because they are labelled data already
    quota: dict[str, int] = field(default_factory=dict)  # per label, what was asked for (proportional selection)
    disagreed: int | None = None  # texts left out because the second view gave another label (agreement)

    def per_label(self, label_names: Sequence[str]) -> dict[str, int]:
        return {name: self.labels.count(name) for name in label_names}


def select_pseudo_labels(
    texts: Sequence[str],
    probabilities: Sequence[Sequence[float]],
    label_names: Sequence[str],
    *,
    threshold: float,
    max_per_label: int | None = None,
    balance_ratio: float = 3.0,
    exclude: Collection[str] = (),
) -> PseudoLabels:
    """The texts whose most probable label has probability ≥ ``threshold``, class-balanced.

    Per label at most ``max_per_label`` texts or, when None, ``balance_ratio`` times the median count of
    confident texts per label (labels with none do not count): a model's pseudo labels lean to the
    classes it already predicts best, and without a cap they would drown the scarce ones. (The median,
    not the scarcest label: with many labels one label with a single confident text would otherwise cap
    every other at a handful; Banking77 at 10 texts per label added 55 texts out of 772 confident.)
    The most confident texts are kept first, ties in text order, so the same inputs give the same
    selection. Texts in ``exclude`` (compared case-, width- and spacing-insensitively) are labelled
    data already: their real label must not compete with a guessed one.
    """
    if len(texts) != len(probabilities):
        raise ValueError(f"{len(texts)} texts but {len(probabilities)} probability rows")
    excluded_keys = {normalise_for_matching(t) for t in exclude}
    by_label: dict[int, list[tuple[float, int]]] = {j: [] for j in range(len(label_names))}
    excluded = 0
    for i, (text, row) in enumerate(zip(texts, probabilities, strict=True)):
        if excluded_keys and normalise_for_matching(text) in excluded_keys:
            excluded += 1
            continue
        best = _argmax(row)
        if row[best] >= threshold:
            by_label[best].append((float(row[best]), i))
    confident = {label_names[j]: len(found) for j, found in by_label.items()}
    counts = [n for n in confident.values() if n]
    if not counts:
        return PseudoLabels([], [], [], confident=confident, cap=0, excluded=excluded)
    cap = max_per_label if max_per_label is not None else max(1, int(balance_ratio * statistics.median(counts)))
    kept_texts, kept_labels, kept_p = [], [], []
    for j, found in by_label.items():
        for p, i in sorted(found, key=lambda item: (-item[0], item[1]))[:cap]:
            kept_texts.append(texts[i])
            kept_labels.append(label_names[j])
            kept_p.append(p)
    return PseudoLabels(kept_texts, kept_labels, kept_p, confident=confident, cap=cap, excluded=excluded)


def select_proportional(
    texts: Sequence[str],
    probabilities: Sequence[Sequence[float]],
    label_names: Sequence[str],
    *,
    fraction: float,
    shares: Sequence[float] | None = None,
    exclude: Collection[str] = (),
) -> PseudoLabels:
    """About ``fraction`` of the texts, shared out between the labels, per label those most probable for it.

    Of ``total = fraction x`` the texts not excluded, label j asks for ``total x shares[j]`` (``shares``
    normalised; None: the model's own predicted label counts over those texts), ranked by their
    probability of j, the highest first, ties in text order.
    There is no threshold: a model trained on little data is often right but unsure (a binary model
    saying 0.53), and a shared threshold then finds nothing, or only the label it leans to. Ranking
    each label by its own probability gives every label its most likely texts however sure the model
    is. A text that more than one label asks for goes to the label it is more probable for (ties: the
    first label); the other label is not given a replacement, so a label can end below its quota.
    Texts in ``exclude`` are labelled data already, as in :func:`select_pseudo_labels`.
    """
    if len(texts) != len(probabilities):
        raise ValueError(f"{len(texts)} texts but {len(probabilities)} probability rows")
    n_labels = len(label_names)
    excluded_keys = {normalise_for_matching(t) for t in exclude}
    candidates = [
        i for i, text in enumerate(texts) if not (excluded_keys and normalise_for_matching(text) in excluded_keys)
    ]
    excluded = len(texts) - len(candidates)
    if shares is None:
        predicted = [0] * n_labels
        for i in candidates:
            row = probabilities[i]
            predicted[_argmax(row)] += 1
        shares = predicted
    if len(shares) != n_labels:
        raise ValueError(f"{len(shares)} shares for {n_labels} labels")
    total = round(min(1.0, fraction) * len(candidates))
    quotas = _apportion(total, shares)
    claims: dict[int, int] = {}  # text index -> the label it goes to
    for j in range(n_labels):
        ranked = sorted(candidates, key=lambda i: (-probabilities[i][j], i))[: quotas[j]]
        for i in ranked:
            held = claims.get(i)
            if held is None or probabilities[i][j] > probabilities[i][held]:
                claims[i] = j
    kept = sorted(claims.items(), key=lambda item: (item[1], -probabilities[item[0]][item[1]], item[0]))
    return PseudoLabels(
        texts=[texts[i] for i, _ in kept],
        labels=[label_names[j] for _, j in kept],
        probabilities=[float(probabilities[i][j]) for i, j in kept],
        excluded=excluded,
        quota={label_names[j]: quotas[j] for j in range(n_labels)},
    )


def _apportion(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``shares``, in whole numbers that add up to it: each part rounded
    down, the rest one by one to the largest remainders (ties: the first)."""
    weight = sum(shares)
    if weight <= 0:
        return [0] * len(shares)
    exact = [total * share / weight for share in shares]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda j: (-(exact[j] - parts[j]), j))
    for j in by_remainder[: total - sum(parts)]:
        parts[j] += 1
    return parts


def second_view_labels(
    unlabelled: np.ndarray, labelled: np.ndarray, labelled_labels: Sequence[str], *, method: str
) -> list[str]:
    """Each unlabelled text's label by a view other than the model's, from embeddings of length 1 (rows):
    the label of the most similar labelled text (``neighbour``) or of the most similar label centroid, the
    mean of a label's labelled rows (``centroid``). Ties go to the first labelled text or label."""
    if len(labelled) != len(labelled_labels) or not len(labelled):
        raise ValueError(f"{len(labelled)} labelled embeddings for {len(labelled_labels)} labels")
    if method == "neighbour":
        nearest = (unlabelled @ labelled.T).argmax(axis=1)
        return [labelled_labels[j] for j in nearest]
    if method == "centroid":
        names = sorted(set(labelled_labels))
        member = np.array(labelled_labels)
        centroids = np.stack([labelled[member == name].mean(axis=0) for name in names])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)
        return [names[j] for j in (unlabelled @ centroids.T).argmax(axis=1)]
    raise ValueError(f"agreement method must be neighbour or centroid, not {method!r}")


def work_dir(target: Path | str) -> Path:
    """Where the rounds for ``target`` are trained: beside it, like training's ``.partial`` folder."""
    target = Path(target)
    return target.with_name(target.name + WORK_SUFFIX)


def self_train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> loop.TrainResult:
    """Train ``config`` by self-training on ``data.unlabeled`` and publish a round as ``output.dir``."""
    console = console or Console(stderr=True)
    st = config.train.semi_supervised
    if st is None or config.data.unlabeled is None:
        raise ConfigError("train.semi_supervised: self-training needs it and data.unlabeled set")
    target = Path(config.output.dir)
    work = work_dir(target)

    # Everything that can fail on bad input fails here, before anything is written.
    _check_output(config, target, work, resume=resume, overwrite=overwrite)
    load_tokenizer(config.model)  # a model that cannot be found fails now, not after the splits are written
    data = prepare_data(config.data, seed=config.train.seed)
    unlabelled = read_unlabelled_texts(config.data.unlabeled, config.data, key="data.unlabeled")
    if st.selection == "threshold":
        _check_threshold(st.threshold, config.train.label_smoothing, len(data.labels))
    if st.teacher is not None:
        _check_teacher(st.teacher, data.labels)
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    split_csv = {
        name: _to_csv(zip(part.texts, part.labels, strict=True)) for name, part in splits.items() if part is not None
    }

    if resume:
        for name, text in split_csv.items():
            kept = work / f"{name}.csv"
            if not kept.is_file() or kept.read_text(encoding="utf-8") != text:
                raise RunDirError(
                    f"data.{name}: its {name} split differs from the interrupted self-training's in {work} "
                    "(the data files changed); resume with the same data, or pass --overwrite to start again"
                )
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        atomic_write_text(work / "config.yaml", config.to_yaml())
        for name, text in split_csv.items():
            atomic_write_text(work / f"{name}.csv", text)

    labelled = [*data.train.texts, *data.validation.texts, *(data.test.texts if data.test else [])]
    unlabelled_digest = _digest("\n".join(unlabelled))
    labelled_counts = [data.train.labels.count(name) for name in data.labels]
    console.print(
        f"self-training: {len(data.train)} labelled training texts, {len(unlabelled)} unlabelled texts, "
        f"rounds {st.rounds}, "
        + (f"threshold {st.threshold}" if st.selection == "threshold" else f"proportional, fraction {st.fraction}")
    )
    second_view = (
        None
        if st.agreement == "none"
        else _second_view(config, st.agreement, data.train.texts, data.train.labels, unlabelled, console, show_progress)
    )
    rounds: list[dict[str, Any]] = []
    previous: list[tuple[str, str]] | None = None
    stopped = None
    for k in range(st.rounds + 1):
        if k == 0:
            train_file, pseudo = work / "train.csv", None
            labelled_by = None
        else:
            labeller = st.teacher if (k == 1 and st.teacher is not None) else work / f"round-{k - 1}"
            labelled_by = str(Path(labeller).absolute())
            pseudo = _pseudo_labels(
                work,
                k,
                Path(labeller),
                unlabelled,
                unlabelled_digest,
                labelled,
                data.labels,
                labelled_counts,
                st,
                config,
                console,
                show_progress,
                second_view,
            )
            selection = sorted(zip(pseudo.texts, pseudo.labels, strict=True))
            if not pseudo.texts:
                stopped = f"round {k}: " + (
                    f"no unlabelled text reached the threshold {st.threshold}"
                    if st.selection == "threshold"
                    else "no unlabelled text left to label"
                )
            elif selection == previous:
                stopped = f"round {k}: the same pseudo labels as round {k - 1} (the rounds have converged)"
            if stopped:
                console.print(f"self-training stops: {stopped}")
                break
            previous = selection
            train_file = work / f"round-{k}-train.csv"
            rows = _to_csv(zip([*data.train.texts, *pseudo.texts], [*data.train.labels, *pseudo.labels], strict=True))
            if not train_file.exists() or train_file.read_text(encoding="utf-8") != rows:
                atomic_write_text(train_file, rows)
        metrics = _train_round(config, work, k, train_file, resume=resume, console=console, show_progress=show_progress)
        record = _round_record(k, metrics, pseudo, data.labels, st, labelled_by)
        rounds.append(record)
        console.print(_describe_round(record, config.train.metric))
        atomic_write_json(work / REPORT_FILE, _report(rounds, st, config, len(unlabelled), stopped, None))

    metric = config.train.metric
    if st.publish == "best":
        chosen = max(rounds, key=lambda r: (r["validation"][metric], r["index"]))["index"]
    else:
        chosen = rounds[-1]["index"]
    report = _report(rounds, st, config, len(unlabelled), stopped, chosen)
    atomic_write_json(work / REPORT_FILE, report)
    pseudo_rows = (
        json.loads((work / f"round-{chosen}-pseudo.json").read_text(encoding="utf-8"))["rows"] if chosen else []
    )
    _publish(work / f"round-{chosen}", target, config, report, pseudo_rows)
    console.print(
        f"self-training: published round {chosen} ({st.publish}; validation {metric} "
        f"{rounds[chosen]['validation'][metric]:.2f}, round 0: {rounds[0]['validation'][metric]:.2f})"
    )
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"run directory: {target}")
    metrics = json.loads(RunDir(target).metrics_file.read_text(encoding="utf-8"))
    return loop.TrainResult(run_dir=target, metrics=metrics)


# --------------------------------------------------------------------------- checks


def _check_threshold(threshold: float, smoothing: float, n_labels: int) -> None:
    """Label smoothing teaches a model to give its answer ``1 - e + e/n``, and it rarely says more: a
    threshold at or above that would find (next to) no pseudo label, rounds of training for nothing."""
    ceiling = 1 - smoothing + smoothing / n_labels
    if threshold >= ceiling - 0.01:
        raise ConfigError(
            f"train.semi_supervised.threshold: {threshold} is at or above what the model is trained to say "
            f"({ceiling:.3f} with train.label_smoothing {smoothing} and {n_labels} labels); choose a lower "
            "threshold (0.7 is the default) or less label smoothing"
        )


def _check_output(config: RunConfig, target: Path, work: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, whatever train would refuse, and a work folder that is not ours."""
    check_replaceable(target, option="output.dir")
    if work.exists() and not _is_work_dir(work):
        raise RunDirError(
            f"output.dir: {work} is not a tuneforge self-training folder; refusing to use or replace it: "
            "choose another output.dir"
        )
    if resume:
        saved = work / "config.yaml"
        if not saved.is_file():
            raise RunDirError(f"output.dir: no interrupted self-training of {target} to resume ({work} not found)")
        loop.check_same_config(saved.read_text(encoding="utf-8"), config, interrupted=f"self-training in {work}")
        return
    if overwrite:
        return
    if work.exists() and any(work.iterdir()):
        raise RunDirError(
            f"output.dir: {work} holds an interrupted self-training of {target}; "
            "pass --resume to continue it or --overwrite to start again"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RunDirError(f"output.dir: {target} already exists; pass --overwrite to replace it")


def _is_work_dir(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    for entry in path.iterdir():
        name = entry.name
        if name in _WORK_FILES or name.startswith(".") or name.startswith("round-"):
            continue
        return False
    return True


def _check_teacher(teacher: Path, labels: list[str]) -> None:
    try:
        theirs = open_run_dir(teacher).labels()
    except TuneforgeError as exc:
        raise ConfigError(f"{_TEACHER_KEY}: {exc}") from None
    if theirs != labels:
        raise ConfigError(
            f"{_TEACHER_KEY}: {teacher} has the labels {theirs}, but the training data's are {labels}; "
            "the teacher must know the same labels in the same order"
        )


# --------------------------------------------------------------------------- rounds


def _round_config(config: RunConfig, work: Path, k: int, train_file: Path) -> RunConfig:
    """An ordinary run's config: the fixed split files, no self-training, the round's folder."""
    raw = config.model_dump()
    test = work / "test.csv"
    raw["data"].update(
        train=train_file,
        validation=work / "validation.csv",
        test=test if test.is_file() else None,
        format="csv",
        text_column="text",
        label_column="label",
        encoding="utf-8",
        max_train_rows=None,  # the labelled split is subsampled already
        unlabeled=None,
    )
    raw["train"]["semi_supervised"] = None
    raw["output"]["dir"] = work / f"round-{k}"
    return RunConfig.model_validate(raw)


def _train_round(
    config: RunConfig, work: Path, k: int, train_file: Path, *, resume: bool, console: Console, show_progress: bool
) -> dict[str, Any]:
    """Train round ``k`` (or keep it, finished; or resume it, interrupted) and return its metrics."""
    run = RunDir(work / f"round-{k}")
    if resume and run.metrics_file.is_file():
        console.print(f"self-training round {k}: finished already, kept ({run.path})")
    else:
        staging = RunDir(loop.staging_dir(run.path))
        resumable = resume and has_checkpoint(staging.checkpoint_dir)
        console.print(
            f"self-training round {k}: " + ("resuming" if resumable else "training") + f" on {train_file.name}"
        )
        # overwrite: a leftover of this round (an unfinished run without a checkpoint, or one that a
        # changed earlier round made stale) is ours to replace.
        loop.train(
            _round_config(config, work, k, train_file),
            resume=resumable,
            overwrite=not resumable,
            console=console,
            show_progress=show_progress,
        )
    return json.loads(run.metrics_file.read_text(encoding="utf-8"))


def _pseudo_labels(
    work: Path,
    k: int,
    labeller: Path,
    unlabelled: list[str],
    unlabelled_digest: str,
    labelled: list[str],
    label_names: list[str],
    labelled_counts: list[int],
    st: SelfTrainingConfig,
    config: RunConfig,
    console: Console,
    show_progress: bool,
    second_view: Callable[[], list[str]] | None = None,
) -> PseudoLabels:
    """Round ``k``'s pseudo labels: reused while the model that made them is unchanged, else made again
    (and then the round's run, trained on other labels, is dropped). With ``second_view`` (one label per
    unlabelled text), only the texts on which it and the model agree are offered to the selection."""
    meta_file = work / f"round-{k}-pseudo.json"
    fingerprint = _digest(json.dumps([_run_fingerprint(labeller), unlabelled_digest, st.model_dump(mode="json")]))
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("fingerprint") == fingerprint:
            console.print(f"self-training round {k}: reusing the pseudo labels in {meta_file.name}")
            return PseudoLabels(
                texts=[t for t, _, _ in meta["rows"]],
                labels=[y for _, y, _ in meta["rows"]],
                probabilities=[p for _, _, p in meta["rows"]],
                confident=meta["confident"],
                cap=meta["cap"],
                excluded=meta["excluded"],
                quota=meta.get("quota", {}),
                disagreed=meta.get("disagreed"),
            )
    for stale in (work / f"round-{k}", loop.staging_dir(work / f"round-{k}")):
        if stale.exists():
            check_replaceable(stale, option="output.dir")
            shutil.rmtree(stale)
    probabilities = _predict(labeller, unlabelled, label_names, config, console, show_progress)
    pool, disagreed = unlabelled, None
    if second_view is not None:
        other = second_view()
        agreeing = [i for i, row in enumerate(probabilities) if label_names[_argmax(row)] == other[i]]
        disagreed = len(unlabelled) - len(agreeing)
        pool, probabilities = [unlabelled[i] for i in agreeing], [probabilities[i] for i in agreeing]
        console.print(
            f"self-training round {k}: the {st.agreement} view disagrees with {labeller.name} on {disagreed} of "
            f"{len(unlabelled)} unlabelled texts; they are left out"
        )
    if st.selection == "threshold":
        pseudo = select_pseudo_labels(
            pool,
            probabilities,
            label_names,
            threshold=st.threshold,
            max_per_label=st.max_per_label,
            balance_ratio=st.balance_ratio,
            exclude=labelled,
        )
    else:
        pseudo = select_proportional(
            pool,
            probabilities,
            label_names,
            fraction=min(1.0, k * st.fraction),
            shares=labelled_counts if st.proportions == "labelled" else None,
            exclude=labelled,
        )
    if disagreed is not None:
        pseudo = replace(pseudo, disagreed=disagreed)
    rows = [[t, y, round(p, 6)] for t, y, p in zip(pseudo.texts, pseudo.labels, pseudo.probabilities, strict=True)]
    meta = {
        "fingerprint": fingerprint,
        "labelled_by": str(labeller.absolute()),
        "confident": pseudo.confident,
        "cap": pseudo.cap,
        "excluded": pseudo.excluded,
        "quota": pseudo.quota,
        "disagreed": pseudo.disagreed,
        "rows": rows,
    }
    atomic_write_json(meta_file, meta)
    return pseudo


def _argmax(row: Sequence[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)  # the first of equal maxima


def _second_view(
    config: RunConfig,
    method: str,
    labelled_texts: Sequence[str],
    labelled_labels: Sequence[str],
    unlabelled: Sequence[str],
    console: Console,
    show_progress: bool,
) -> Callable[[], list[str]]:
    """The agreement view's labels for the unlabelled texts, embedded once and only if a round needs them
    (a resumed run whose pseudo labels are all kept never loads the encoder)."""

    @functools.cache
    def labels() -> list[str]:
        texts = [*labelled_texts, *unlabelled]
        with progress_bar(console, show_progress) as progress:
            task = progress.add_task("embed", total=len(texts), info=config.model.name)
            rows = sentence_embeddings(
                config.model,
                texts,
                batch_size=config.train.eval_batch_size,
                on_batch=lambda n: progress.advance(task, n),
            )
        cut = len(labelled_texts)
        return second_view_labels(rows[cut:], rows[:cut], labelled_labels, method=method)

    return labels


def _predict(
    labeller: Path, texts: list[str], label_names: list[str], config: RunConfig, console: Console, show_progress: bool
) -> list[list[float]]:
    # A teacher is checked up front (_check_teacher); a round's model is this run's own. The raw softmax,
    # not the run's calibrated one: the threshold and its label-smoothing ceiling (_check_threshold) are on it.
    predictor = Predictor(
        labeller,
        open_set=False,
        calibrated=False,
        threads=config.train.threads,
        batch_size=config.train.eval_batch_size,
    )
    if predictor.labels != label_names:
        raise RunDirError(f"{labeller}: has the labels {predictor.labels}, not the training data's {label_names}")
    out: list[list[float]] = []
    with progress_bar(console, show_progress) as progress:
        task = progress.add_task("pseudo-label", total=len(texts), info=labeller.name)
        for start in range(0, len(texts), _PREDICT_CHUNK):
            chunk = texts[start : start + _PREDICT_CHUNK]
            out.extend(predictor.predict_proba(chunk))
            progress.advance(task, len(chunk))
    return out


def _run_fingerprint(run: Path) -> str:
    """What identifies a model's version cheaply: its run's small files (metrics.json is rewritten, with
    new timings, by every training), plus where it is."""
    h = hashlib.sha256(str(run.absolute()).encode())
    for name in ("labels.json", "metrics.json", "config.yaml", "variant.json"):
        file = run / name
        h.update(name.encode() + (file.read_bytes() if file.is_file() else b"-"))
    return h.hexdigest()


# --------------------------------------------------------------------------- report and publish


def _round_record(
    k: int,
    metrics: dict[str, Any],
    pseudo: PseudoLabels | None,
    label_names: list[str],
    st: SelfTrainingConfig,
    labelled_by: str | None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "index": k,
        "train_examples": metrics["train"]["examples"],
        "pseudo_labelled": 0 if pseudo is None else len(pseudo.texts),
        "pseudo_labelled_per_label": {name: 0 for name in label_names}
        if pseudo is None
        else pseudo.per_label(label_names),
        "threshold": None if pseudo is None or st.selection != "threshold" else st.threshold,
        "labelled_by": labelled_by,
        "validation": {"accuracy": metrics["validation"]["accuracy"], "macro_f1": metrics["validation"]["macro_f1"]},
    }
    if pseudo is not None and st.selection == "threshold":
        record["confident_per_label"] = pseudo.confident
        record["cap_per_label"] = pseudo.cap
    if pseudo is not None and st.selection == "proportional":
        record["quota_per_label"] = pseudo.quota
    if pseudo is not None:
        record["skipped_as_labelled"] = pseudo.excluded
    if pseudo is not None and pseudo.disagreed is not None:
        record["left_out_by_agreement"] = pseudo.disagreed
    if "test" in metrics:
        record["test"] = {"accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"]}
    return record


def _describe_round(record: dict[str, Any], metric: str) -> str:
    added = ""
    if record["index"]:
        per_label = ", ".join(f"{name} {n}" for name, n in record["pseudo_labelled_per_label"].items())
        added = f", {record['pseudo_labelled']} pseudo-labelled added ({per_label})"
    return (
        f"self-training round {record['index']}: {record['train_examples']} training examples{added}; "
        f"validation {metric} {record['validation'][metric]:.2f}"
    )


def _report(
    rounds: list[dict[str, Any]],
    st: SelfTrainingConfig,
    config: RunConfig,
    n_unlabelled: int,
    stopped: str | None,
    published: int | None,
) -> dict[str, Any]:
    return {
        "method": st.method,
        "settings": st.model_dump(mode="json"),
        "unlabelled_texts": n_unlabelled,
        "metric": config.train.metric,
        "published_round": published,
        "chosen_by": f"best validation {config.train.metric} (ties: the later round)"
        if st.publish == "best"
        else "the last round",
        "stopped_early": stopped,
        "rounds": rounds,
    }


def _publish(
    round_dir: Path, target: Path, config: RunConfig, report: dict[str, Any], pseudo_rows: list[list[Any]]
) -> None:
    """Copy the chosen round in as ``target`` (one swap), with the report, the user's own config and the
    round's pseudo labels (text, label, the labelling model's probability of it)."""
    check_replaceable(target, option="output.dir")  # whatever is there now, not when the run started
    if not is_run_dir(round_dir):
        raise RunDirError(f"{round_dir}: the round's run is missing")

    def write(folder: Path) -> None:
        # A copy, not a move: until the swap, a kill leaves the rounds whole for --resume.
        shutil.copytree(round_dir, folder, dirs_exist_ok=True)
        atomic_write_text(folder / "config.yaml", config.to_yaml())
        atomic_write_json(folder / REPORT_FILE, report)
        if pseudo_rows:
            atomic_write_text(
                folder / PSEUDO_LABELS_FILE, _to_csv(pseudo_rows, header=("text", "label", "probability"))
            )

    atomic_replace_dir(target, write)


def _to_csv(rows: Iterable[Sequence[Any]], *, header: Sequence[str] = ("text", "label")) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
