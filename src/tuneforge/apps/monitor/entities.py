"""Which companies an item is about: a user's alias list (name -> ticker) matched in the text.

Matching is on word boundaries (``Acme`` is not found in ``Acmeville``; ``$ACME`` and ``(ACME)`` are
found), longest alias first (``Acme Bank`` beats ``Acme``), with runs of spaces in an alias matching any
whitespace. Case: with ``case_sensitive="auto"`` an all-capital alias (a ticker: ``ON``, ``IT``) matches
only as written, so that ordinary words never count, and any other alias (a name) matches in any case.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from tuneforge.errors import ConfigError

# An entity column written as one string: "ACME; GLOBX" or "ACME,GLOBX" or "ACME|GLOBX".
_SEPARATORS = re.compile(r"[;,|]")


def _is_capitals(alias: str) -> bool:
    letters = [c for c in alias if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


class AliasMatcher:
    """Find entities in texts. Build once (one compiled pattern), call ``find`` per text."""

    def __init__(self, aliases: Mapping[str, str], *, case_sensitive: bool | str = "auto") -> None:
        self.exact: dict[str, str] = {}
        self.folded: dict[str, str] = {}
        alternatives: list[tuple[int, str]] = []
        for alias, entity in aliases.items():
            name = " ".join(str(alias).split())
            if not name or not str(entity).strip():
                raise ConfigError(f"entities: empty alias or entity in {alias!r} -> {entity!r}")
            sensitive = _is_capitals(name) if case_sensitive == "auto" else bool(case_sensitive)
            table, key = (self.exact, name) if sensitive else (self.folded, name.casefold())
            if table.get(key, entity) != entity:
                raise ConfigError(f"entities: alias {alias!r} names two entities: {table[key]!r} and {entity!r}")
            table[key] = str(entity).strip()
            body = r"\s+".join(re.escape(word) for word in name.split(" "))
            alternatives.append((len(name), body if sensitive else f"(?i:{body})"))
        # Longest first: at one position the regex takes the first alternative that matches.
        alternatives.sort(key=lambda item: -item[0])
        self.pattern: re.Pattern[str] | None = (
            re.compile(r"(?<!\w)(?:" + "|".join(body for _, body in alternatives) + r")(?!\w)")
            if alternatives
            else None
        )

    def __bool__(self) -> bool:
        return self.pattern is not None

    def resolve(self, name: str) -> str:
        """The entity an entity column's value stands for: an alias's entity (``Acme Corp`` -> ``ACME``), else
        the value as written."""
        cleaned = " ".join(name.split())
        return self.exact.get(cleaned) or self.folded.get(cleaned.casefold()) or name

    def find(self, text: str) -> list[str]:
        """The entities named in ``text``, each once, in order of first mention."""
        if self.pattern is None:
            return []
        found: dict[str, None] = {}
        for match in self.pattern.finditer(text):
            name = " ".join(match.group(0).split())
            entity = self.exact.get(name) or self.folded.get(name.casefold())
            if entity is not None:
                found[entity] = None
        return list(found)


def split_entities(value: object) -> list[str]:
    """An entity column's value as a list: a JSON list, or one string split on ``;``, ``,`` or ``|``."""
    if value is None:
        return []
    if isinstance(value, list):
        items: Iterable[object] = value
    elif isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError:
                items = _SEPARATORS.split(stripped.strip("[]"))
        else:
            items = _SEPARATORS.split(stripped)
    else:
        items = [value]
    out: dict[str, None] = {}
    for item in items:
        name = str(item).strip().strip("'\"")
        if name:
            out[name] = None
    return list(out)


def read_alias_file(path: Path) -> dict[str, str]:
    """Aliases from a .csv (alias,entity after a header row) or a .yaml/.yml/.json mapping alias -> entity
    (or entity -> list of aliases)."""
    if not path.is_file():
        raise ConfigError(f"entities.alias_file: {path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
        if not rows or len(rows[0]) < 2:
            raise ConfigError(f"entities.alias_file: {path}: expected a header and rows of alias,entity")
        out: dict[str, str] = {}
        for number, row in enumerate(rows[1:], start=2):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ConfigError(f"entities.alias_file: {path}: row {number}: expected alias,entity")
            out[row[0].strip()] = row[1].strip()
        return out
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"entities.alias_file: {path}: use .csv, .yaml, .yml or .json")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"entities.alias_file: {path}: not valid: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"entities.alias_file: {path}: expected a mapping alias -> entity")
    out = {}
    for key, value in raw.items():
        if isinstance(value, list):  # entity -> [aliases]
            out.update({str(alias): str(key) for alias in value})
        elif isinstance(value, str | int):
            out[str(key)] = str(value)
        else:
            raise ConfigError(f"entities.alias_file: {path}: {key!r}: expected an entity name or a list of aliases")
    return out


def build_matcher(
    aliases: Mapping[str, str],
    alias_file: Path | None,
    *,
    case_sensitive: bool | str = "auto",
    match_entity_names: bool = True,
) -> AliasMatcher:
    """One matcher for the inline aliases, the alias file's and (optionally) each entity's own name."""
    merged: dict[str, str] = {}
    if alias_file is not None:
        merged.update(read_alias_file(alias_file))
    merged.update(aliases)
    if match_entity_names:
        for entity in set(merged.values()):
            merged.setdefault(entity, entity)
    return AliasMatcher(merged, case_sensitive=case_sensitive)
