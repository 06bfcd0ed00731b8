"""Explanations for people: words highlighted in the terminal (rich), or a self-contained HTML page.

Green words pushed the model towards the label, red ones away from it; the stronger the colour, the
larger the score. The colour is never the only carrier: the terminal adds a line naming the strongest
words with their scores, and each word of the page has its score as a tooltip and an accessible name,
and can be reached with the keyboard. The page loads nothing from anywhere (inline CSS, no script).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from rich.text import Text

from tuneforge.explain.core import Explanation
from tuneforge.files import atomic_write_text

# Scores are differences of probabilities: below this, a word's colour would dramatise noise.
_MIN_SCALE = 0.05
_FAINT = 0.1  # strength under which a word is left uncoloured
_SHOWN = 0.0005  # scores are printed to 3 decimals
_FOR = (22, 163, 74)  # green
_AGAINST = (220, 38, 38)  # red


def _scale(scores: Sequence[float]) -> float:
    return max([abs(score) for score in scores] + [_MIN_SCALE])


def strengths(explanation: Explanation) -> list[float]:
    """Each word's score relative to the strongest one (-1..1), the same scale in the terminal and the page."""
    scale = _scale(explanation.scores)
    return [score / scale for score in explanation.scores]


def strongest(explanation: Explanation, count: int = 3) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The ``count`` words with the highest scores (for the label) and the lowest negative ones (against)."""
    pairs = [(word.text, score) for word, score in zip(explanation.words, explanation.scores, strict=True)]
    # A score that rounds to 0.000 where it is printed is neither for nor against.
    supporting = sorted((pair for pair in pairs if pair[1] >= _SHOWN), key=lambda pair: -pair[1])[:count]
    opposing = sorted((pair for pair in pairs if pair[1] <= -_SHOWN), key=lambda pair: pair[1])[:count]
    return supporting, opposing


def _listed(pairs: list[tuple[str, float]]) -> str:
    return ", ".join(f"{word} {score:+.3f}" for word, score in pairs) or "none"


def _summary(explanation: Explanation) -> str:
    method = explanation.method.replace("_", " ")
    line = f"{explanation.label} (p={explanation.probability:.3f}) by {method}"
    if explanation.delta is not None:
        line += f", completeness delta {explanation.delta:+.4f}"
    return line


def terminal_text(explanation: Explanation) -> Text:
    """The text as typed with its words coloured, a summary line above and the strongest words below."""
    out = Text()
    out.append(_summary(explanation) + "\n", style="bold")
    cursor = 0
    for word, strength in zip(explanation.words, strengths(explanation), strict=True):
        out.append(explanation.text[cursor : word.start])
        style = ""
        if abs(strength) >= _FAINT:
            red, green, blue = _FOR if strength > 0 else _AGAINST
            level = 0.25 + 0.75 * abs(strength)  # blend with white: faint to full colour
            background = tuple(round(255 - (255 - channel) * level) for channel in (red, green, blue))
            style = f"black on rgb({background[0]},{background[1]},{background[2]})"
        out.append(word.text, style=style)
        cursor = word.end
    out.append(explanation.text[cursor:] + "\n")
    supporting, opposing = strongest(explanation)
    out.append(f"  for: {_listed(supporting)}\n  against: {_listed(opposing)}\n", style="dim")
    return out


_CSS = """
  :root { color-scheme: light; }
  body { font: 16px/1.6 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #fff;
         color: #1d2939; }
  main { max-width: 50rem; margin: 0 auto; padding: 1.5rem 1rem 3rem; }
  h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
  h2 { font-size: 1.05rem; margin: 0 0 .35rem; }
  .muted { color: #475467; font-size: .9rem; }
  section { border-top: 1px solid #d0d5dd; padding: .9rem 0; }
  .text { font-size: 1.1rem; margin: .2rem 0 .4rem; overflow-wrap: anywhere; white-space: pre-wrap; }
  mark { color: #101828; background: transparent; border-radius: 3px; padding: 0 .08em; }
  mark:focus-visible { outline: 3px solid #2463eb; outline-offset: 1px; }
  .legend mark { padding: 0 .35em; }
"""


def _mark(word: str, score: float, strength: float, label: str) -> str:
    red, green, blue = _FOR if score > 0 else _AGAINST
    alpha = 0.0 if abs(strength) < _FAINT else round(0.15 + 0.6 * abs(strength), 3)
    towards = "for" if score >= _SHOWN else "against" if score <= -_SHOWN else "neutral to"
    name = f"{word}: {score:+.3f}, {towards} {label}"
    return (
        f'<mark tabindex="0" style="background-color: rgba({red}, {green}, {blue}, {alpha})" '
        f'title="{html.escape(f"{score:+.4f}")}" aria-label="{html.escape(name)}">{html.escape(word)}</mark>'
    )


def _section(number: int, explanation: Explanation) -> str:
    parts: list[str] = []
    cursor = 0
    for word, score, strength in zip(explanation.words, explanation.scores, strengths(explanation), strict=True):
        parts.append(html.escape(explanation.text[cursor : word.start]))
        parts.append(_mark(word.text, score, strength, explanation.label))
        cursor = word.end
    parts.append(html.escape(explanation.text[cursor:]))
    supporting, opposing = strongest(explanation)
    return (
        f'<section aria-labelledby="e{number}">\n'
        f'<h2 id="e{number}">{number}. {html.escape(_summary(explanation))}</h2>\n'
        f'<p class="text">{"".join(parts)}</p>\n'
        f'<p class="muted">For: {html.escape(_listed(supporting))}. Against: {html.escape(_listed(opposing))}.</p>\n'
        "</section>"
    )


def html_report(explanations: Sequence[Explanation], *, title: str = "tuneforge explanations", about: str = "") -> str:
    """A self-contained page: inline CSS, no script, no link to anything, so it opens anywhere, offline."""
    legend = (
        '<p class="muted legend">Each word\'s score is how much it moved the probability of the label: '
        '<mark style="background-color: rgba(22, 163, 74, 0.6)">towards it</mark> or '
        '<mark style="background-color: rgba(220, 38, 38, 0.6)">away from it</mark>; '
        "the stronger the colour, the larger the score. Tab through the words to hear or see each score.</p>"
    )
    body = "\n".join(_section(i, explanation) for i, explanation in enumerate(explanations, start=1))
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        + (f'<p class="muted">{html.escape(about)}</p>\n' if about else "")
        + f"{legend}\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_html_report(
    path: Path | str, explanations: Sequence[Explanation], *, title: str = "tuneforge explanations", about: str = ""
) -> Path:
    """Write :func:`html_report` to ``path`` atomically (a reader never sees half a page)."""
    path = Path(path)
    atomic_write_text(path, html_report(explanations, title=title, about=about))
    return path
