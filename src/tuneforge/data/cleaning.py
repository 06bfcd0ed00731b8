"""Text cleaning for training and the normalisation the audit uses to match texts."""

from __future__ import annotations

import html
import re
import unicodedata

from tuneforge.data.readers import LabelledTexts

# str patterns match Unicode whitespace too (NBSP, line/paragraph separators), not just ASCII.
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str, *, lowercase: bool = False) -> str:
    """NFKC, unescape HTML entities, collapse whitespace to single spaces, strip; optionally lower-case."""
    # Unescape first so entities that decode to compatibility characters are normalised as well.
    text = unicodedata.normalize("NFKC", html.unescape(text))
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text


def clean_texts(data: LabelledTexts, *, lowercase: bool = False) -> tuple[LabelledTexts, int]:
    """Clean every text; rows whose text is empty afterwards are dropped and counted."""
    cleaned = [clean_text(text, lowercase=lowercase) for text in data.texts]
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
