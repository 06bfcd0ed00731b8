"""Data audit: duplicates, conflicting labels, leakage between splits, class balance, token lengths,
and how well the tokenizer's vocabulary covers the texts (unknown tokens, characters per token, CJK).

The report is a plain JSON-serialisable dict so it can be written into the run directory as is.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any

import numpy as np

from tuneforge.data.cleaning import normalise_for_matching
from tuneforge.data.readers import LabelledTexts

MAX_EXAMPLES = 10
_TOKENIZE_BATCH = 1000
_PERCENTILES = (50, 90, 95, 99)
# A registry name of tuneforge.pretrained (multilingual: XLM-R's 250k vocabulary, ~100 languages), kept as
# a plain string: data must not import the model packages (import-linter contract data-no-models).
SUGGESTED_MODEL = "multilingual-e5-small"
UNKNOWN_SHARE_WARN = 0.05
CJK_HEAVY_SHARE = 0.3  # of a split's characters
# Everyday Chinese needs ~3,500 distinct characters; an English vocabulary holds a few hundred.
FEW_CJK_TOKENS = 2000
# Han ideographs (with extension A and compatibility forms), kana, hangul syllables.
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
# How format_audit names what the reader skipped or changed (keys of LabelledTexts.read_counts).
_READ_COUNTS = {
    "blank_lines": "blank lines skipped",
    "empty_texts": "empty texts dropped",
    "labels_stripped": "labels with spaces stripped",
    "labels_from_numbers": "numeric labels made text (1.0 -> 1)",
    "texts_from_numbers": "numeric texts made text",
    "texts_cleaned": "texts changed by cleaning",
}


def _match_key(text: str) -> bytes:
    """A 16-byte digest of the normalised text: equal for texts that match, 49 bytes per key in memory
    instead of a second copy of every text (at 128 bits a false match is not a practical concern)."""
    return blake2b(normalise_for_matching(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _conflicts(data: LabelledTexts) -> tuple[int, dict[bytes, dict[str, list[int]]]]:
    """(number of distinct normalised texts, normalised text -> label -> positions, for conflicts only).

    The first pass keeps one label per normalised text, not every position, so memory grows with the
    distinct texts only; positions are collected in a second pass for the (usually few) conflicts.
    """
    first_label: dict[bytes, str] = {}
    conflicted: set[bytes] = set()
    for text, label in zip(data.texts, data.labels, strict=True):
        key = _match_key(text)
        if first_label.setdefault(key, label) != label:
            conflicted.add(key)
    distinct = len(first_label)
    del first_label
    groups: dict[bytes, dict[str, list[int]]] = {}
    if conflicted:
        for i, text in enumerate(data.texts):
            key = _match_key(text)
            if key in conflicted:
                groups.setdefault(key, defaultdict(list))[data.labels[i]].append(i)
    return distinct, groups


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token counts including special tokens, without truncation; tokenised in batches to bound memory."""
    return _encode_stats(tokenizer, texts)[0]


def _encode_stats(tokenizer: Any, texts: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """Token counts per text and, from the same encoding, totals for the vocabulary coverage check:
    content tokens (special tokens other than the unknown one left out), unknown tokens, characters
    and CJK characters."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    # [CLS]/[SEP] (<s>/</s>) are in every encoding; counting them would dilute the shares.
    specials = set(getattr(tokenizer, "all_special_ids", None) or ()) - {unk_id}
    lengths: list[int] = []
    totals = {"tokens": 0, "unknown": 0, "chars": 0, "cjk_chars": 0}
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = list(texts[start : start + _TOKENIZE_BATCH])
        # verbose=False: HF warns about every text longer than the model limit, which is what we measure.
        encoded = tokenizer(batch, add_special_tokens=True, truncation=False, verbose=False)
        for ids in encoded["input_ids"]:
            lengths.append(len(ids))
            # list.count runs in C: no per-token Python loop over a large file.
            totals["tokens"] += len(ids) - sum(ids.count(special) for special in specials)
            if unk_id is not None:
                totals["unknown"] += ids.count(unk_id)
        for text in batch:
            totals["chars"] += len(text)
            totals["cjk_chars"] += _cjk_chars(text)
    return lengths, totals


def _cjk_chars(text: str) -> int:
    """How many characters of ``text`` are Chinese, Japanese or Korean (ideographs, kana, hangul)."""
    return sum(len(run) for run in _CJK_RUN.findall(text))


def _coverage(totals: dict[str, int]) -> dict[str, Any]:
    tokens, chars = totals["tokens"], totals["chars"]
    return {
        "unknown_tokens": totals["unknown"],
        "unknown_share": round(totals["unknown"] / tokens, 4) if tokens else 0.0,
        "chars_per_token": round(chars / tokens, 2) if tokens else None,
        "cjk_share": round(totals["cjk_chars"] / chars, 4) if chars else 0.0,
    }


def _vocabulary_cjk_tokens(tokenizer: Any) -> int | None:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    return sum(1 for token in get_vocab() if _CJK_RUN.search(token))


def _coverage_warnings(splits: dict[str, dict[str, Any]], tokenizer: Any) -> list[str]:
    """Warnings when the tokenizer's vocabulary covers the data poorly, naming a model that fits.

    ``splits`` maps split names to their reports' ``coverage``. Two signs: many unknown tokens
    (whatever the language), and CJK-heavy text read by a vocabulary with almost no CJK tokens (its
    tokens are then single known characters at best: the unknown share alone can look tolerable).
    """
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    # No point suggesting the model the data is already read with.
    fix = "" if SUGGESTED_MODEL in name else f"; a model whose vocabulary fits: model.name: {SUGGESTED_MODEL}"
    warnings = []
    unknown = {split: c["unknown_share"] for split, c in splits.items() if c["unknown_share"] > UNKNOWN_SHARE_WARN}
    if unknown:
        unk = getattr(tokenizer, "unk_token", None) or "unknown"
        shares = ", ".join(f"{split} {share:.1%}" for split, share in unknown.items())
        warnings.append(
            f"the tokenizer reads {shares} of the tokens as {unk} (over {UNKNOWN_SHARE_WARN:.0%}): "
            f"its vocabulary covers this data poorly{fix}"
        )
    cjk = {split: c["cjk_share"] for split, c in splits.items() if c["cjk_share"] >= CJK_HEAVY_SHARE}
    if cjk:
        in_vocab = _vocabulary_cjk_tokens(tokenizer)
        if in_vocab is not None and in_vocab < FEW_CJK_TOKENS:
            shares = ", ".join(f"{split} {share:.0%}" for split, share in cjk.items())
            warnings.append(
                f"the texts are CJK ({shares} of characters) but the tokenizer's vocabulary has only "
                f"{in_vocab:,} CJK tokens{fix}"
            )
    return warnings


def _length_stats(lengths: list[int], max_length: int | None) -> dict[str, Any]:
    if not lengths:
        return {}
    values = np.asarray(lengths)
    # "higher" gives an actual token count, and errs on the long side when choosing max_length.
    stats: dict[str, Any] = {f"p{q}": int(np.percentile(values, q, method="higher")) for q in _PERCENTILES}
    stats["max"] = int(values.max())
    stats["mean"] = round(float(values.mean()), 1)
    if max_length is not None:
        truncated = int((values > max_length).sum())
        stats["max_length"] = max_length
        stats["truncated"] = truncated
        stats["truncated_share"] = round(truncated / len(lengths), 4)
    return stats


def _split_report(data: LabelledTexts, tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    counts = Counter(data.labels)
    distinct, groups = _conflicts(data)
    conflicts = list(groups.items())
    conflict_examples = []
    for _key, by_label in conflicts[:MAX_EXAMPLES]:
        first = min(i for positions in by_label.values() for i in positions)
        conflict_examples.append(
            {
                "text": data.texts[first],
                "labels": sorted(by_label),
                "rows": sorted(data.rows[i] for positions in by_label.values() for i in positions)[:5],
            }
        )
    report: dict[str, Any] = {
        "source": data.source,
        "rows": len(data),
        "classes": len(counts),
        "class_counts": dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
        "imbalance_ratio": round(max(counts.values()) / min(counts.values()), 2) if counts else None,
        # Extra copies beyond the first; "normalised" ignores case, width and spacing, so it includes exact.
        "exact_duplicates": len(data) - len(set(data.texts)),
        "normalised_duplicates": len(data) - distinct,
        "conflicting_labels": {
            "count": len(conflicts),
            "rows": sum(len(positions) for _, by_label in conflicts for positions in by_label.values()),
            "examples": conflict_examples,
        },
    }
    if tokenizer is not None:
        lengths, totals = _encode_stats(tokenizer, data.texts)
        report["token_lengths"] = _length_stats(lengths, max_length)
        report["coverage"] = _coverage(totals)
    return report


def audit_splits(
    splits: dict[str, LabelledTexts], *, tokenizer: Any = None, max_length: int | None = None
) -> dict[str, Any]:
    """Audit each split and, when a ``train`` split is given, leakage and unseen labels against it.

    With a tokenizer, each split also gets ``token_lengths`` and ``coverage``, and ``warnings`` lists
    what a user should act on before training (a vocabulary that covers the data poorly).
    """
    report: dict[str, Any] = {
        "splits": {
            name: _split_report(data, tokenizer, max_length) for name, data in splits.items() if data is not None
        },
        "leakage": {},
        "labels_not_in_train": {},
        "warnings": [],
    }
    if tokenizer is not None:
        coverage = {name: split["coverage"] for name, split in report["splits"].items()}
        report["warnings"] = _coverage_warnings(coverage, tokenizer)
    train = splits.get("train")
    if train is None:
        return report
    others = {name: data for name, data in splits.items() if name != "train" and data is not None}
    # Held-out splits are the small ones: keep their keys and scan train, not the other way round.
    keys = {name: [_match_key(text) for text in data.texts] for name, data in others.items()}
    held_keys = {key for split_keys in keys.values() for key in split_keys}
    in_train = {key for text in train.texts if (key := _match_key(text)) in held_keys}
    train_labels = set(train.labels)
    for name, data in others.items():
        leaked = [i for i, key in enumerate(keys[name]) if key in in_train]
        report["leakage"][name] = {
            "count": len(leaked),
            "share": round(len(leaked) / len(data), 4) if len(data) else 0.0,
            "examples": [{"text": data.texts[i], "row": data.rows[i]} for i in leaked[:MAX_EXAMPLES]],
        }
        unseen = sorted(set(data.labels) - train_labels)
        if unseen:
            report["labels_not_in_train"][name] = unseen
    return report


def drop_conflicts(data: LabelledTexts) -> tuple[LabelledTexts, int]:
    """Drop every row whose normalised text occurs with more than one label (no label can be trusted)."""
    _, groups = _conflicts(data)
    bad = {i for by_label in groups.values() for positions in by_label.values() for i in positions}
    keep = [i for i in range(len(data)) if i not in bad]
    return data.subset(keep), len(data) - len(keep)


def drop_leaked(train: LabelledTexts, others: list[LabelledTexts]) -> tuple[LabelledTexts, int]:
    """Drop train rows whose normalised text occurs in any of ``others`` (validation/test)."""
    held_out = {_match_key(text) for data in others if data is not None for text in data.texts}
    keep = [i for i, text in enumerate(train.texts) if _match_key(text) not in held_out]
    return train.subset(keep), len(train) - len(keep)


def _split_line(name: str, split: dict[str, Any]) -> str:
    parts = [f"{split['rows']:,} rows", f"{split['classes']} classes"]
    if split.get("imbalance_ratio") is not None and split["classes"] > 1:
        parts[-1] += f" (max/min {split['imbalance_ratio']:g})"
    conflicts = split["conflicting_labels"]["count"]
    parts.append(f"duplicates {split['exact_duplicates']:,} exact / {split['normalised_duplicates']:,} normalised")
    parts.append(f"{conflicts:,} texts with conflicting labels")
    lengths = split.get("token_lengths")
    if lengths:
        text = f"tokens p50 {lengths['p50']} p95 {lengths['p95']} max {lengths['max']}"
        if "truncated" in lengths:
            text += f", {lengths['truncated']:,} ({lengths['truncated_share']:.1%}) over {lengths['max_length']}"
        parts.append(text)
    coverage = split.get("coverage")
    if coverage and coverage["chars_per_token"] is not None:
        text = f"{coverage['chars_per_token']:g} chars/token, {coverage['unknown_share']:.1%} unknown"
        if coverage["cjk_share"]:
            text += f", {coverage['cjk_share']:.0%} CJK characters"
        parts.append(text)
    return f"{name}: " + ", ".join(parts)


def format_audit(report: dict[str, Any]) -> str:
    """A few plain-text lines summarising an audit report, for the terminal."""
    lines = [_split_line(name, split) for name, split in report.get("splits", {}).items()]
    leakage = report.get("leakage", {})
    if leakage:
        lines.append(
            "overlap with train: " + ", ".join(f"{name} {info['count']:,} rows" for name, info in leakage.items())
        )
    for name, labels in report.get("labels_not_in_train", {}).items():
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        lines.append(f"labels in {name} but not in train: {shown}")
    dropped = {key: value for key, value in report.get("dropped", {}).items() if value}
    if dropped:
        lines.append("dropped: " + ", ".join(f"{key} {value:,}" for key, value in dropped.items()))
    for name, counts in report.get("reading", {}).items():
        shown = [f"{_READ_COUNTS.get(key, key)} {value:,}" for key, value in counts.items() if value]
        if shown:
            lines.append(f"read {name}: " + ", ".join(shown))
    lines.extend(f"warning: {warning}" for warning in report.get("warnings", []))
    return "\n".join(lines)
