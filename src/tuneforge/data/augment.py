"""Text augmentation operations: pure, seeded text -> text functions that know nothing of models.

Operations (names as the CLI and configs spell them):

- ``swap``, ``delete``, ``insert``: EDA (Wei & Zou 2019) random swap, deletion and insertion, without
  WordNet: an inserted word is another word of the same text. On CJK text they act on characters, or
  with ``cjk_units="words"`` on Chinese words (jieba, the ``zh`` extra): most Chinese words are two
  characters, and moving or dropping one character of a word leaves a string no reader writes.
- ``typo``: keyboard noise on letters (a neighbouring key, a dropped or a doubled character).
- ``case``: casing noise (all lower case, a capitalised first letter, or one word in capitals).
- ``neighbour``: whole words replaced by their nearest neighbours in a model's word-embedding space.
  This module picks the words (never stop words, numbers, entity-like tokens, e-mails or URLs); the
  neighbours come from a lookup the caller passes in (``tuneforge.augment`` builds one from a
  model's input embeddings), so that data stays free of models.
- ``paraphrase``: the whole text said again by a generative model. Generation is costly and batch-shaped,
  so ``tuneforge.augment.paraphrase`` makes every paraphrase beforehand, in one cached pass, and the
  caller passes in a lookup (text, copy) -> paraphrase, or why there is none.

Each copy of each text gets its own random generator, seeded from (seed, operation, copy, text): the
result of one text does not depend on the others, on their order or on which other operations run,
which is what a cache keyed by text (inline augmentation in training) needs.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tuneforge.data.cleaning import normalise_for_matching
from tuneforge.data.segment import chinese_pieces
from tuneforge.errors import DataError

#: Operations that need no model; ``neighbour`` needs a neighbour lookup, ``paraphrase`` a paraphrase lookup.
MODEL_FREE_OPERATIONS = ("swap", "delete", "insert", "typo", "case")
OPERATIONS = (*MODEL_FREE_OPERATIONS, "neighbour", "paraphrase")
#: Operations that act on CJK characters (the others leave a CJK text unchanged).
CJK_OPERATIONS = ("swap", "delete", "insert")
#: What those operations move, drop or repeat in CJK text: single characters, or Chinese words (jieba).
CJK_UNITS = ("characters", "words")
DEFAULT_RATE = 0.1

#: A lookup from a lower-case word to its nearest neighbours, best first; empty when it has none.
NeighbourLookup = Callable[[str], Sequence[str]]


@dataclass(frozen=True)
class Rejected:
    """No copy: why (a paraphrase that was empty, an echo of the prompt, far too long ...), for the report."""

    reason: str


#: A lookup from (text, copy number) to that copy's paraphrase, or why there is none.
ParaphraseLookup = Callable[[str, int], str | Rejected]

# Han ideographs (extension A, unified, compatibility), kana. Hangul is written with spaces between
# words, so Korean takes the word-level operations.
_CJK_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_CJK_OR_NOT = re.compile(f"[{_CJK_CHARS}]+|[^{_CJK_CHARS}]+")
_LETTER = re.compile(r"[^\W\d_]")
# A word in a whitespace-separated token: leading and trailing punctuation stay where they are.
_WORD_IN_TOKEN = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)
_URL_OR_EMAIL = re.compile(r"(://|www\.|@|\.[a-z]{2,4}(/|$))", re.IGNORECASE)
_SENTENCE_END = (".", "!", "?", "…")

# Words that carry no topic: replacing them changes grammar, not meaning (or flips it: "not").
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been before being
    below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down
    during each few for from further had hadn't has hasn't have haven't having he her here hers herself him
    himself his how i if in into is isn't it it's its itself just let's me more most mustn't my myself no nor
    not now of off on once only or other ought our ours ourselves out over own same shan't she should
    shouldn't so some such than that that's the their theirs them themselves then there there's these they
    this those through to too under until up very was wasn't we were weren't what when where which while who
    whom why will with won't would wouldn't you your yours yourself yourselves also really quite still
    even never ever yet already much many""".split()
)

# Rows of a QWERTY keyboard; a key's neighbours are the keys beside it and those above and below.
_KEY_ROWS = ("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm")


def _key_neighbours() -> dict[str, str]:
    where = {key: (r, c) for r, row in enumerate(_KEY_ROWS) for c, key in enumerate(row)}
    out = {}
    for key, (r, c) in where.items():
        if not key.isalpha():
            continue
        near = []
        for dr, dc in ((0, -1), (0, 1), (-1, 0), (-1, 1), (1, 0), (1, -1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < len(_KEY_ROWS) and 0 <= cc < len(_KEY_ROWS[rr]) and _KEY_ROWS[rr][cc].isalpha():
                near.append(_KEY_ROWS[rr][cc])
        out[key] = "".join(near)
    return out


_KEYBOARD = _key_neighbours()


def is_cjk(char: str) -> bool:
    return bool(_CJK.match(char))


def is_cjk_text(text: str) -> bool:
    """True when most letters of ``text`` are CJK characters (a Chinese review with a brand name in it)."""
    letters = _LETTER.findall(text)
    if not letters:
        return False
    return sum(1 for char in letters if is_cjk(char)) * 2 >= len(letters)


def rng_for(seed: int, operation: str, copy: int, text: str) -> random.Random:
    """The generator for one copy of one text: independent of every other text and operation."""
    digest = hashlib.sha256(f"{seed}\0{operation}\0{copy}\0{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _count(n: int, rate: float) -> int:
    # EDA's n = alpha * length, at least one change.
    return max(1, round(rate * n))


def _check_rate(rate: float) -> None:
    if not 0.0 < rate <= 1.0:
        raise DataError(f"augmentation rate: must be in (0, 1], got {rate}")


# --- word-level operations ------------------------------------------------------------------------


def random_swap(text: str, rng: random.Random, *, rate: float = DEFAULT_RATE, cjk_units: str = "characters") -> str:
    """Swap two words (two CJK characters, or words, in a CJK text) ``rate * length`` times."""
    if is_cjk_text(text):
        return _cjk_swap(text, rng, rate, cjk_units)
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(_count(len(words), rate)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_deletion(text: str, rng: random.Random, *, rate: float = DEFAULT_RATE, cjk_units: str = "characters") -> str:
    """Delete each word (CJK character or word) with probability ``rate``; at least one goes, one stays."""
    if is_cjk_text(text):
        return _cjk_delete(text, rng, rate, cjk_units)
    words = text.split()
    if len(words) < 2:
        return text
    keep = [rng.random() >= rate for _ in words]
    if all(keep):
        keep[rng.randrange(len(words))] = False
    if not any(keep):
        keep[rng.randrange(len(words))] = True
    return " ".join(word for word, kept in zip(words, keep, strict=True) if kept)


def random_insertion(
    text: str, rng: random.Random, *, rate: float = DEFAULT_RATE, cjk_units: str = "characters"
) -> str:
    """Insert ``rate * length`` words of the text itself (CJK: characters or words) at random places."""
    if is_cjk_text(text):
        return _cjk_insert(text, rng, rate, cjk_units)
    words = text.split()
    if len(words) < 2:
        return text
    pool = [w for w in (_WORD_IN_TOKEN.match(word).group(2) for word in words) if w]  # type: ignore[union-attr]
    if not pool:
        return text
    for _ in range(_count(len(words), rate)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
    return " ".join(words)


# --- character noise ----------------------------------------------------------------------------


def typo_noise(text: str, rng: random.Random, *, rate: float = DEFAULT_RATE) -> str:
    """Keyboard typos in ``rate`` of the words: a neighbouring key, a dropped or a doubled letter.

    Only letters of words longer than two characters change (not "a", "I", digits or CJK text).
    """
    if is_cjk_text(text):
        return text
    tokens = text.split(" ")
    candidates = [i for i, token in enumerate(tokens) if sum(c.isalpha() and c.isascii() for c in token) > 2]
    if not candidates:
        return text
    for i in rng.sample(candidates, min(len(candidates), _count(len(candidates), rate))):
        token = tokens[i]
        positions = [p for p, c in enumerate(token) if c.isalpha() and c.isascii()]
        p = rng.choice(positions)
        kind = rng.choice(("key", "drop", "double"))
        char = token[p]
        if kind == "key":
            near = rng.choice(_KEYBOARD[char.lower()])
            token = token[:p] + (near.upper() if char.isupper() else near) + token[p + 1 :]
        elif kind == "drop":
            token = token[:p] + token[p + 1 :]
        else:
            token = token[:p] + char + token[p:]
        tokens[i] = token
    return " ".join(tokens)


def case_noise(text: str, rng: random.Random, *, rate: float = DEFAULT_RATE) -> str:
    """One casing change: the text in lower case, its first letter capitalised, or ``rate`` of its words
    in capitals (what users type on phones and in anger)."""
    if is_cjk_text(text):
        return text
    kinds = []
    if text != text.lower():
        kinds.append("lower")
    if text[:1].islower():
        kinds.append("capitalise")
    words = text.split(" ")
    shoutable = [i for i, word in enumerate(words) if sum(c.isalpha() for c in word) > 1 and word != word.upper()]
    if shoutable:
        kinds.append("shout")
    if not kinds:
        return text
    kind = rng.choice(kinds)
    if kind == "lower":
        return text.lower()
    if kind == "capitalise":
        return text[0].upper() + text[1:]
    for i in rng.sample(shoutable, min(len(shoutable), _count(len(shoutable), rate))):
        words[i] = words[i].upper()
    return " ".join(words)


# --- nearest-neighbour substitution ---------------------------------------------------------------


def substitutable(word: str, *, sentence_start: bool) -> bool:
    """Whether ``word`` (punctuation already stripped) may be replaced by an embedding neighbour.

    Never stop words (grammar, negation), numbers or anything with a digit (order ids, prices), e-mails and
    URLs, words in capitals (acronyms, codes) or capitalised words in mid-sentence (names, brands, places).
    """
    if len(word) < 3 or not word.isalpha() or word.lower() in STOP_WORDS:
        return False
    if _URL_OR_EMAIL.search(word) or word.isupper():
        return False
    if word[0].isupper():
        # A capital at the start of a sentence says nothing; anywhere else it marks a name.
        return sentence_start and word[1:].islower()
    return word.islower()


def neighbour_substitution(
    text: str, rng: random.Random, *, neighbours: NeighbourLookup, rate: float = DEFAULT_RATE
) -> str:
    """Replace ``rate`` of the substitutable words by one of their nearest embedding neighbours.

    Punctuation around a word stays; a sentence-initial capital is kept on the replacement.
    """
    if is_cjk_text(text):
        return text
    tokens = text.split(" ")
    choices: list[tuple[int, str, str, str, Sequence[str]]] = []
    sentence_start = True
    for i, token in enumerate(tokens):
        match = _WORD_IN_TOKEN.match(token)
        assert match is not None  # the pattern matches any string
        before, word, after = match.groups()
        if (
            word
            and not _URL_OR_EMAIL.search(token)
            and substitutable(word, sentence_start=sentence_start and not before.strip("\"'(["))
        ):
            found = [n for n in neighbours(word.lower()) if n.lower() != word.lower()]
            if found:
                choices.append((i, before, word, after, found))
        if token:
            sentence_start = token.endswith(_SENTENCE_END)
    if not choices:
        return text
    for i, before, word, after, found in rng.sample(choices, min(len(choices), _count(len(choices), rate))):
        new = rng.choice(list(found))
        if word[0].isupper():
            new = new[0].upper() + new[1:]
        tokens[i] = before + new + after
    return " ".join(tokens)


# --- CJK: characters or words, never inside the non-CJK runs between them ----------------------------


def _cjk_units(text: str, kind: str = "characters") -> list[str]:
    """The text as units: each CJK character (or Chinese word) alone, each maximal run of anything else
    whole. A unit is a CJK one when its first character is CJK."""
    if kind not in CJK_UNITS:
        raise DataError(f"CJK units: unknown {kind!r}; choose from {', '.join(CJK_UNITS)}")
    if kind == "words":
        # A jieba word that mixes scripts ("3点") is cut where the script changes.
        pieces = [run for word in chinese_pieces(text) for run in _CJK_OR_NOT.findall(word)]
    else:
        pieces = list(text)
    units: list[str] = []
    for piece in pieces:
        if is_cjk(piece[0]) or not units or is_cjk(units[-1][0]):
            units.append(piece)
        else:
            units[-1] += piece
    return units


def _cjk_positions(units: list[str]) -> list[int]:
    return [i for i, unit in enumerate(units) if is_cjk(unit[0])]


def _cjk_swap(text: str, rng: random.Random, rate: float, kind: str = "characters") -> str:
    units = _cjk_units(text, kind)
    positions = _cjk_positions(units)
    if len({units[i] for i in positions}) < 2:
        return text
    for _ in range(_count(len(positions), rate)):
        i, j = rng.sample(positions, 2)
        units[i], units[j] = units[j], units[i]
    return "".join(units)


def _cjk_delete(text: str, rng: random.Random, rate: float, kind: str = "characters") -> str:
    units = _cjk_units(text, kind)
    positions = _cjk_positions(units)
    if len(positions) < 2:
        return text
    gone = {i for i in positions if rng.random() < rate}
    if not gone:
        gone = {rng.choice(positions)}
    if len(gone) == len(positions):
        gone.discard(rng.choice(positions))
    return "".join(unit for i, unit in enumerate(units) if i not in gone)


def _cjk_insert(text: str, rng: random.Random, rate: float, kind: str = "characters") -> str:
    units = _cjk_units(text, kind)
    positions = _cjk_positions(units)
    if len(positions) < 2:
        return text
    pool = [units[i] for i in positions]
    for _ in range(_count(len(positions), rate)):
        # Only next to a CJK character: a gap between two units (the runs are maximal) never cuts a run.
        gaps = [
            g
            for g in range(len(units) + 1)
            if (g > 0 and is_cjk(units[g - 1][0])) or (g < len(units) and is_cjk(units[g][0]))
        ]
        units.insert(rng.choice(gaps), rng.choice(pool))
    return "".join(units)


# --- applying operations to a dataset ----------------------------------------------------------------


def parse_operations(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"swap,delete"`` or a list -> validated operation names, in order, without repeats."""
    names = [part.strip() for part in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"augmentation operations: none given; choose from {', '.join(OPERATIONS)}")
    unknown = [name for name in names if name not in OPERATIONS]
    if unknown:
        raise DataError(
            f"augmentation operations: unknown {', '.join(repr(n) for n in unknown)}; "
            f"choose from {', '.join(OPERATIONS)}"
        )
    return tuple(dict.fromkeys(names))


def apply_operation(
    operation: str,
    text: str,
    rng: random.Random,
    *,
    rate: float = DEFAULT_RATE,
    neighbours: NeighbourLookup | None = None,
    paraphrases: ParaphraseLookup | None = None,
    copy: int = 0,
    cjk_units: str = "characters",
) -> str:
    """One augmented copy of ``text`` (copy number ``copy``); the text itself when the operation cannot
    change it (for ``paraphrase``: when the lookup has no paraphrase of it)."""
    if operation == "paraphrase":
        if paraphrases is None:
            raise DataError(_NEEDS_PARAPHRASES)
        found = paraphrases(text, copy)
        return found if isinstance(found, str) else text
    if operation == "neighbour":
        if neighbours is None:
            raise DataError("augmentation operation 'neighbour' needs a model's word embeddings (a neighbour lookup)")
        return neighbour_substitution(text, rng, neighbours=neighbours, rate=rate)
    function = _FUNCTIONS.get(operation)
    if function is None:
        raise DataError(f"augmentation operation: unknown {operation!r}; choose from {', '.join(OPERATIONS)}")
    if operation in CJK_OPERATIONS:
        return function(text, rng, rate=rate, cjk_units=cjk_units)
    return function(text, rng, rate=rate)


_NEEDS_PARAPHRASES = "augmentation operation 'paraphrase' needs a generative model (a paraphrase lookup)"

_FUNCTIONS: dict[str, Callable[..., str]] = {
    "swap": random_swap,
    "delete": random_deletion,
    "insert": random_insertion,
    "typo": typo_noise,
    "case": case_noise,
}


@dataclass(frozen=True)
class Candidate:
    """One augmented text: which original (index) it came from, by which operation and copy."""

    text: str
    label: str
    source: int
    operation: str
    copy: int


@dataclass
class OperationCounts:
    generated: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, object]:
        return {"generated": self.generated, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


def _exact_key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def classes_to_augment(labels: Sequence[str], balance_below: int | None) -> set[str]:
    """Every label, or with ``balance_below`` only those with fewer rows than it."""
    counts = Counter(labels)
    if balance_below is None:
        return set(counts)
    if balance_below < 1:
        raise DataError(f"balance below: must be at least 1, got {balance_below}")
    return {label for label, n in counts.items() if n < balance_below}


def generate_candidates(
    texts: Sequence[str],
    labels: Sequence[str],
    operations: Sequence[str],
    *,
    copies: int = 1,
    seed: int = 0,
    rate: float = DEFAULT_RATE,
    neighbours: NeighbourLookup | None = None,
    paraphrases: ParaphraseLookup | None = None,
    balance_below: int | None = None,
    counts: dict[str, OperationCounts] | None = None,
    on_text: Callable[[], None] | None = None,
    cjk_units: str = "characters",
) -> list[Candidate]:
    """``copies`` augmented copies of each text per operation, deduplicated.

    Dropped here (counted per operation in ``counts``): ``unchanged`` (the operation could not change
    the text), ``duplicate_of_original`` (equal to an original text under normalised matching) and
    ``duplicate`` (equal to an earlier candidate), and for ``paraphrase`` the lookup's reasons.
    ``on_text`` is called once per original (progress). ``cjk_units``: what swap, delete and insert act
    on in CJK text (``characters``, or ``words``: Chinese words by jieba).
    """
    if copies < 1:
        raise DataError(f"copies: must be at least 1, got {copies}")
    if len(texts) != len(labels):
        raise DataError(f"augmentation: {len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise DataError("augmentation: no texts to augment")
    _check_rate(rate)
    if cjk_units not in CJK_UNITS:
        raise DataError(f"CJK units: unknown {cjk_units!r}; choose from {', '.join(CJK_UNITS)}")
    operations = parse_operations(operations)
    if "neighbour" in operations and neighbours is None:
        raise DataError("augmentation operation 'neighbour' needs a model's word embeddings (a neighbour lookup)")
    if "paraphrase" in operations and paraphrases is None:
        raise DataError(_NEEDS_PARAPHRASES)
    counts = counts if counts is not None else {}
    for operation in operations:
        counts.setdefault(operation, OperationCounts())
    wanted = classes_to_augment(labels, balance_below)
    # Two keys: casing noise differs from its original only in case, which normalised matching ignores
    # (it casefolds), so its copies are matched exactly (up to Unicode form and spacing) instead.
    originals = {False: {normalise_for_matching(t) for t in texts}, True: {_exact_key(t) for t in texts}}
    seen = {False: set(originals[False]), True: set(originals[True])}
    out: list[Candidate] = []
    for index, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if label in wanted:
            for operation in operations:
                for copy in range(copies):
                    tally = counts[operation]
                    tally.generated += 1
                    if operation == "paraphrase":
                        assert paraphrases is not None  # checked above
                        found = paraphrases(text, copy)
                        if isinstance(found, Rejected):
                            tally.dropped[found.reason] += 1
                            continue
                        new = found
                    else:
                        new = apply_operation(
                            operation,
                            text,
                            rng_for(seed, operation, copy, text),
                            rate=rate,
                            neighbours=neighbours,
                            cjk_units=cjk_units,
                        )
                    exact = operation == "case"
                    key = _exact_key(new) if exact else normalise_for_matching(new)
                    if new == text or not key:
                        tally.dropped["unchanged"] += 1
                    elif key in originals[exact]:
                        tally.dropped["duplicate_of_original"] += 1
                    elif key in seen[exact]:
                        tally.dropped["duplicate"] += 1
                    else:
                        seen[True].add(_exact_key(new))
                        if not exact:
                            seen[False].add(key)
                        out.append(Candidate(new, label, index, operation, copy))
        if on_text is not None:
            on_text()
    return out
