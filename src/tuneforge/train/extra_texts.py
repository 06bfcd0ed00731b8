"""Texts a run trains on beyond its labelled training split, made once and kept for a resumed run.

- ``data.augment``: augmented copies of the training split, labelled like their originals (and, with a
  filter run, kept only if that model still agrees). Never of validation or test texts.
- ``distill.transfer_data``: texts without labels, from a file and/or augmented copies of the training
  split, that the distillation teacher labels with its logits (Jiao et al. 2020, TinyBERT; Tang et al.
  2019). Texts equal to a validation or test text are dropped (counted), so the teacher never hands the
  student the answers to its own exam.

Both are kept in the staging run's ``checkpoints/`` folder with a fingerprint of what made them (the
options and the training texts): a resumed run reuses them instead of generating them again. They are
seeded per text (see :mod:`tuneforge.data.augment`), so generating them again gives the same texts.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

from tuneforge.augment.pipeline import AugmentOptions, augment_texts
from tuneforge.config import AugmentConfig, RunConfig
from tuneforge.data import PreparedData
from tuneforge.data.cleaning import normalise_for_matching
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.files import atomic_write_json
from tuneforge.train.unlabelled import read_unlabelled_texts

AUGMENTED_FILE = "checkpoints/augmented.json"
TRANSFER_FILE = "checkpoints/transfer_texts.json"


@dataclass
class AugmentedCopies:
    """The kept copies (not the originals) and the pipeline's report (per operation: kept, dropped by why)."""

    texts: list[str]
    labels: list[str]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransferTexts:
    texts: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def augment_options(cfg: AugmentConfig, run: RunConfig, *, with_filter: bool = True) -> AugmentOptions:
    """The pipeline's options for a config section; the seed defaults to the run's, neighbours to its model."""
    return AugmentOptions(
        operations=tuple(cfg.operations),
        copies=cfg.copies,
        seed=run.train.seed if cfg.seed is None else cfg.seed,
        rate=cfg.rate,
        balance_below=cfg.balance_below,
        filter_run=cfg.filter_run if with_filter else None,
        min_probability=cfg.min_probability,
        neighbour_model=cfg.neighbour_model or run.model.name,
        paraphrase_engine=cfg.paraphrase_engine,
        cjk_units=cfg.cjk_units,
    )


def augmented_copies(
    config: RunConfig, data: PreparedData, staging: Path, *, resume: bool, progress: Progress | None = None
) -> AugmentedCopies | None:
    """``data.augment``'s copies of the training split: kept ones from an interrupted run, else made now."""
    cfg = config.data.augment
    if cfg is None:
        return None
    options = augment_options(cfg, config)
    fingerprint = _fingerprint("augment", options, data.train.texts, data.train.labels)
    kept = _load(staging / AUGMENTED_FILE, fingerprint) if resume else None
    if kept is not None:
        return AugmentedCopies(kept["texts"], kept["labels"], {**kept["report"], "reused": True})
    try:
        result = augment_texts(data.train.texts, data.train.labels, options, progress=progress)
    except TuneforgeError as exc:  # a bad filter run or neighbour model, named by its key
        raise type(exc)(f"data.augment: {exc}") from None
    n = len(data.train)
    return AugmentedCopies(result.texts[n:], result.labels[n:], {**result.report, "fingerprint": fingerprint})


def transfer_texts(
    config: RunConfig, data: PreparedData, staging: Path, *, resume: bool, progress: Progress | None = None
) -> TransferTexts | None:
    """``distill.transfer_data``: the unlabelled file's texts and augmented copies, less any validation or
    test text and anything already in the training split, sampled to ``max_texts`` with the run's seed."""
    cfg = config.distill.transfer_data
    if cfg is None:
        return None
    options = augment_options(cfg.augment, config, with_filter=False) if cfg.augment is not None else None
    file_texts = read_unlabelled_texts(cfg.file, config.data, key="distill.transfer_data.file") if cfg.file else []
    fingerprint = _fingerprint("transfer", options, data.train.texts, file_texts, cfg.max_texts, config.train.seed)
    kept = _load(staging / TRANSFER_FILE, fingerprint) if resume else None
    if kept is not None:
        return TransferTexts(kept["texts"], {**kept["report"], "reused": True})

    copies: list[str] = []
    augment_report = None
    if options is not None:
        try:
            result = augment_texts(data.train.texts, data.train.labels, options, progress=progress)
        except TuneforgeError as exc:
            raise type(exc)(f"distill.transfer_data.augment: {exc}") from None
        copies, augment_report = result.texts[len(data.train) :], result.report
    held_out = {
        normalise_for_matching(text)
        for split in (data.validation, data.test)
        if split is not None
        for text in split.texts
    }
    in_train = {normalise_for_matching(text) for text in data.train.texts}
    texts, dropped = [], {"in_validation_or_test": 0, "in_train": 0, "repeated": 0}
    seen: set[str] = set()
    for text in [*file_texts, *copies]:
        key = normalise_for_matching(text)
        if key in held_out:
            dropped["in_validation_or_test"] += 1
        elif key in in_train:
            dropped["in_train"] += 1
        elif key in seen:
            dropped["repeated"] += 1
        else:
            seen.add(key)
            texts.append(text)
    sampled_out = 0
    if cfg.max_texts is not None and len(texts) > cfg.max_texts:
        keep = sorted(random.Random(config.train.seed).sample(range(len(texts)), cfg.max_texts))
        sampled_out = len(texts) - cfg.max_texts
        texts = [texts[i] for i in keep]
    if not texts:
        raise DataError(
            "distill.transfer_data: no texts left (all were validation/test texts, training texts or repeats)"
        )
    report = {
        "texts": len(texts),
        "from_file": len(file_texts),
        "augmented_copies": len(copies),
        "dropped": dropped,
        "sampled_out": sampled_out,
        "augment": augment_report,
        "fingerprint": fingerprint,
    }
    return TransferTexts(texts, report)


def save_augmented(staging: Path, copies: AugmentedCopies) -> None:
    payload = {"texts": copies.texts, "labels": copies.labels, "report": copies.report}
    atomic_write_json(staging / AUGMENTED_FILE, {"fingerprint": copies.report["fingerprint"], **payload})


def save_transfer(staging: Path, transfer: TransferTexts) -> None:
    payload = {"texts": transfer.texts, "report": transfer.report}
    atomic_write_json(staging / TRANSFER_FILE, {"fingerprint": transfer.report["fingerprint"], **payload})


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the audit keeps of an augmentation report: counts, not texts."""
    return {key: value for key, value in report.items() if key not in ("per_label",)}


def _fingerprint(kind: str, options: AugmentOptions | None, *parts: Any) -> str:
    digest = hashlib.sha256(kind.encode("utf-8"))
    if options is not None:
        described = {key: str(value) for key, value in options.__dict__.items()}
        digest.update(json.dumps(described, sort_keys=True).encode("utf-8"))
    for part in parts:
        digest.update(b"\1" + json.dumps(part, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _load(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The kept payload if it was made from exactly these inputs; anything else is made again."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("fingerprint") != fingerprint:
        return None
    return payload
