"""The words a user typed, and which of a tokenizer's sub-words belong to each.

An explanation is read against the text as typed, so words are cut from the raw text (offsets into it),
never from the cleaned or tokenized text: ``"I've LOST my card!"`` has four words whatever the tokenizer
makes of them. Words are runs of non-space characters; in scripts written without spaces (Chinese, Japanese
kana) each character is a word, which is also what a Chinese BERT's tokens are. Scripts without spaces and
without a per-character convention here (Thai, Khmer, ...) come out as one word per space-separated run.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from tuneforge.data.cleaning import clean_text
from tuneforge.errors import ModelError

# Kana, CJK ideographs (extension A, unified, compatibility) and halfwidth katakana: one word a character.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CHUNK = re.compile(r"\S+")


@dataclass(frozen=True)
class Word:
    """One word of the text as typed: ``text == original[start:end]``."""

    text: str
    start: int
    end: int


def split_words(text: str) -> list[Word]:
    """The words of ``text`` with their character offsets; whitespace is never part of a word."""
    return [Word(match.group(), match.start(), match.end()) for match in _WORD.finditer(text)]


def without_word(text: str, word: Word) -> str:
    """``text`` with ``word`` left out (the spaces around it stay; cleaning collapses them as in training)."""
    return text[: word.start] + text[word.end :]


@dataclass(frozen=True)
class TokenAlignment:
    """The token ids the model reads for a text, and the word (an index into the words) each token came from."""

    input_ids: list[int]
    word_of_token: list[int | None]  # None: a special token ([CLS], [SEP], <s>, ...) or one of no word


def cleaned_with_spans(
    text: str, words: list[Word], *, lowercase: bool = False, chinese_script: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The cleaned text the model reads and each word's span in it.

    Cleaning (NFKC, entities, case, Chinese script) works on a space-separated run at a time, so that a
    phrase-aware script conversion still sees its phrase; when cleaning changes how many words the run has
    (a compatibility character that decomposes into a space, say), its words are cleaned one by one instead.
    """
    by_chunk: dict[int, list[int]] = {}
    chunks = list(_CHUNK.finditer(text))
    starts = [chunk.start() for chunk in chunks]
    for index, word in enumerate(words):
        by_chunk.setdefault(bisect.bisect_right(starts, word.start) - 1, []).append(index)
    pieces: list[str] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(words)
    offset = 0
    for c, chunk in enumerate(chunks):
        members = by_chunk.get(c, [])
        cleaned = clean_text(chunk.group(), lowercase=lowercase, chinese_script=chinese_script)
        units = [(m.start(), m.end()) for m in _WORD.finditer(cleaned)]
        if len(units) != len(members):
            parts = [clean_text(words[i].text, lowercase=lowercase, chinese_script=chinese_script) for i in members]
            cleaned, units, at = "".join(parts), [], 0
            for part in parts:
                units.append((at, at + len(part)))
                at += len(part)
        if not cleaned:
            for i in members:
                spans[i] = (offset, offset)  # nothing left to read; empty, and in order for the search below
            continue
        if pieces:
            offset += 1  # the single space cleaning leaves between runs
        for i, (start, end) in zip(members, units, strict=True):
            spans[i] = (offset + start, offset + end)
        pieces.append(cleaned)
        offset += len(cleaned)
    return " ".join(pieces), spans


def align_tokens(
    tokenizer: Any,
    text: str,
    words: list[Word],
    *,
    max_length: int,
    lowercase: bool = False,
    chinese_script: str | None = None,
) -> TokenAlignment:
    """Tokenize ``text`` as the model reads it (cleaned, truncated to ``max_length``) and map each token back
    to a word through the tokenizer's character offsets; sub-words of one word all map to it."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"{type(tokenizer).__name__}: word-level attributions need a fast tokenizer (character offsets)"
        )
    cleaned, spans = cleaned_with_spans(text, words, lowercase=lowercase, chinese_script=chinese_script)
    encoding = tokenizer(cleaned, truncation=True, max_length=max_length, return_offsets_mapping=True)
    span_starts = [start for start, _ in spans]

    def word_at(position: int) -> int | None:
        index = bisect.bisect_right(span_starts, position) - 1
        # Empty spans (a word cleaning removed) contain nothing; step back over them.
        while index >= 0 and spans[index][0] == spans[index][1]:
            index -= 1
        return index if index >= 0 and spans[index][0] <= position < spans[index][1] else None

    owners: list[int | None] = []
    for start, end in encoding["offset_mapping"]:
        if end <= start:
            owners.append(None)
            continue
        # A SentencePiece token may start on the space before its word ("▁card"): its last character decides.
        owner = word_at(start)
        owners.append(owner if owner is not None else word_at(end - 1))
    return TokenAlignment(list(encoding["input_ids"]), owners)
