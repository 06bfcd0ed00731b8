"""Text cleaning for training and the normalisation the audit uses to match texts."""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable
from functools import cache

from tuneforge.data.readers import LabelledTexts
from tuneforge.errors import ConfigError

# str patterns match Unicode whitespace too (NBSP, line/paragraph separators), not just ASCII.
_WHITESPACE = re.compile(r"\s+")
# Han ideographs (extension A, unified, compatibility): texts without any need no script conversion.
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# data.chinese_script -> the OpenCC conversion that produces it (phrase-aware, e.g. 头发 -> 頭髮, 发现 -> 發現).
_OPENCC = {"simplified": "t2s", "traditional": "s2t"}


def clean_text(text: str, *, lowercase: bool = False, chinese_script: str | None = None) -> str:
    """NFKC, unescape HTML entities, collapse whitespace to single spaces, strip; optionally lower-case
    and convert Chinese to one script (``"simplified"`` or ``"traditional"``)."""
    # Unescape first so entities that decode to compatibility characters are normalised as well.
    text = unicodedata.normalize("NFKC", html.unescape(text))
    text = _WHITESPACE.sub(" ", text).strip()
    if chinese_script is not None and _HAN.search(text):
        text = _script_converter(chinese_script)(text)
    return text.lower() if lowercase else text


@cache
def _script_converter(script: str) -> Callable[[str], str]:
    if script not in _OPENCC:
        raise ConfigError(f"data.chinese_script: expected simplified, traditional or null, got {script!r}")
    from opencc_purepy import OpenCC  # loads its dictionaries: only for runs that ask for it

    # The direction methods raise on failure; OpenCC.convert would return the error text as the result.
    return getattr(OpenCC(), _OPENCC[script])


def clean_texts(
    data: LabelledTexts, *, lowercase: bool = False, chinese_script: str | None = None
) -> tuple[LabelledTexts, int]:
    """Clean every text; rows whose text is empty afterwards are dropped and counted."""
    cleaned = [clean_text(text, lowercase=lowercase, chinese_script=chinese_script) for text in data.texts]
    keep = [i for i, text in enumerate(cleaned) if text]
    result = LabelledTexts(
        texts=[cleaned[i] for i in keep],
        labels=[data.labels[i] for i in keep],
        rows=[data.rows[i] for i in keep],
        source=data.source,
    )
    return result, len(data) - len(keep)


def normalise_for_matching(text: str) -> str:
    """A key under which texts that differ only in case, width or spacing compare equal."""
    # NFKC around casefold: casefolding can produce characters that NFKC composes differently.
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _WHITESPACE.sub(" ", text).strip()
