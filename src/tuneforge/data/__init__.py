"""Data reading, cleaning, splitting, auditing and batching.

The batching helpers need torch; they are loaded on first use so that reading and auditing data
(e.g. ``tuneforge audit``) does not pay for importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneforge.data.audit import audit_splits, drop_conflicts, drop_leaked, format_audit, token_lengths
from tuneforge.data.cleaning import clean_text, clean_texts, normalise_for_matching
from tuneforge.data.prepare import PreparedData, check_known_labels, prepare_data, read_eval_file, sort_labels
from tuneforge.data.readers import LabelledTexts, read_labelled_file
from tuneforge.data.segment import segment_words
from tuneforge.data.splits import stratified_split, stratified_subsample

if TYPE_CHECKING:
    from tuneforge.data.batching import collate, encode_texts, length_grouped_batches

_BATCHING = ("collate", "encode_texts", "length_grouped_batches")

__all__ = [
    "LabelledTexts",
    "PreparedData",
    "audit_splits",
    "check_known_labels",
    "clean_text",
    "clean_texts",
    "collate",
    "drop_conflicts",
    "drop_leaked",
    "encode_texts",
    "format_audit",
    "length_grouped_batches",
    "normalise_for_matching",
    "prepare_data",
    "read_eval_file",
    "read_labelled_file",
    "segment_words",
    "sort_labels",
    "stratified_split",
    "stratified_subsample",
    "token_lengths",
]


def __getattr__(name: str) -> Any:
    if name in _BATCHING:
        from tuneforge.data import batching

        return getattr(batching, name)
    raise AttributeError(f"module 'tuneforge.data' has no attribute {name!r}")
