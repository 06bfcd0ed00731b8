"""Word units for methods that need them (TF-IDF over words, word-level augmentation).

Chinese is written without spaces between words, so its words come from jieba (the optional extra
``tuneforge[zh]``); languages that separate words with spaces are split on whitespace.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import ModuleType

from tuneforge.errors import DataError

# Written without spaces between words like Chinese, but with no segmenter here: splitting them on
# whitespace would return whole sentences as "words".
_NO_SEGMENTER = {"ja", "th", "lo", "km", "my"}


def segment_words(texts: Iterable[str], language: str) -> list[list[str]]:
    """The words of each text: jieba for ``language="zh"``, whitespace splitting for languages written with
    spaces between words (``"en"``, ``"de"``, ``"ko"``, ...); whitespace itself is never a word."""
    code = language.lower().split("-")[0].split("_")[0]  # zh-Hans, zh_TW -> zh
    if code == "zh":
        jieba = _jieba()
        return [[word for word in jieba.lcut(text) if not word.isspace()] for text in texts]
    if code in _NO_SEGMENTER:
        raise DataError(f"no word segmenter for language {language!r}; use character n-grams for it instead")
    return [text.split() for text in texts]


def chinese_pieces(text: str) -> list[str]:
    """``text`` cut into jieba's words, keeping everything between them (spaces, punctuation, Latin):
    the pieces join back into ``text``."""
    return _jieba().lcut(text)


def _jieba() -> ModuleType:
    try:
        import jieba
    except ImportError:
        raise DataError(
            "Chinese word segmentation needs jieba, the optional extra zh: pip install 'tuneforge[zh]'"
        ) from None
    # jieba logs each dictionary load ("Building prefix dict ...") to stderr.
    jieba.setLogLevel(logging.WARNING)
    return jieba
