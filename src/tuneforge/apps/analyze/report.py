"""The analysis as files: a self-contained HTML page (inline CSS, no script, no external reference: it
opens offline and from an e-mail), a CSV of the suspect rows, and the data without them (to retrain on).
All written atomically: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from tuneforge.apps.analyze.analysis import Analysis
from tuneforge.apps.analyze.figures import Mistake
from tuneforge.apps.analyze.label_errors import Suspect
from tuneforge.config import DataConfig
from tuneforge.data import read_labelled_file
from tuneforge.errors import DataError
from tuneforge.files import atomic_write_text, atomic_write_with

SUSPECT_COLUMNS = ("text", "given_label", "suggested_label", "confidence", "row", "given_label_probability")
HTML_SUSPECTS = 500
# Not TSV: tuneforge reads TSV unquoted (as SST-2 needs), so a text holding a tab or a line break could not
# be written back as it was.
DATA_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       color: #1d2330; line-height: 1.4; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #5a6272; font-size: .9rem; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid #d9dde5; border-radius: 6px; padding: .5rem .9rem; min-width: 8rem; }
.card b { display: block; font-size: 1.3rem; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { border-bottom: 1px solid #e4e7ee; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f6fa; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.note { background: #fff8e1; border-left: 3px solid #e0b000; padding: .4rem .8rem; margin: .4rem 0; }
.bad { color: #b3261e; } .good { color: #1b7f3b; }
.w { border-radius: 3px; padding: 0 1px; }
"""


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _explained(mistake: Mistake) -> str:
    """The text with each word shaded by how much it pushed the model to its (wrong) answer."""
    if not mistake.explanation:
        return escape(mistake.text)
    peak = max(abs(score) for _, score in mistake.explanation) or 1.0
    parts = []
    for word, score in mistake.explanation:
        alpha = round(min(abs(score) / peak, 1.0) * 0.6, 3)
        colour = f"rgba(214,40,40,{alpha})" if score > 0 else f"rgba(40,120,214,{alpha})"
        parts.append(f'<span class="w" style="background:{colour}" title="{score:+.4f}">{escape(word)}</span>')
    return " ".join(parts)


def render_html(analysis: Analysis) -> str:
    """The report as one HTML string (escaped throughout: the texts are the user's)."""
    s = analysis.summary
    cards = "".join(
        f'<div class="card">{escape(name)}<b>{escape(value)}</b></div>'
        for name, value in (
            ("texts", f"{s['n']:,}"),
            ("accuracy", f"{s['accuracy']:.2f}%"),
            ("macro-F1", f"{s['macro_f1']:.2f}"),
            ("ECE", f"{s['ece']:.4f}"),
            ("mean confidence", f"{s['mean_confidence']:.3f}"),
            ("probable label errors", f"{len(analysis.suspects):,}"),
        )
    )
    notes = "".join(f'<p class="note">{escape(note)}</p>' for note in analysis.notes)
    pairs = _table(
        ["label A", "label B", "A answered as B", "B answered as A", "total"],
        [[escape(p.a), escape(p.b), str(p.a_as_b), str(p.b_as_a), str(p.total)] for p in analysis.pairs],
        numeric=(2, 3, 4),
    )
    mistakes = _table(
        [
            "row",
            "text (red: words for the wrong answer, blue: against it)",
            "given",
            "answered",
            "confidence",
            "p(given)",
        ],
        [
            [
                str(m.row),
                _explained(m),
                escape(m.given_label),
                f'<span class="bad">{escape(m.predicted_label)}</span>',
                _num(m.confidence),
                _num(m.given_probability),
            ]
            for m in analysis.mistakes
        ],
        numeric=(0, 4, 5),
    )
    classes = _table(
        [
            "label",
            "texts",
            "answered",
            "recall",
            "precision",
            "confidence when answered",
            "overconfidence",
            "classwise ECE",
        ],
        [
            [
                escape(c["label"]),
                str(c["support"]),
                str(c["answered"]),
                _num(c["recall"]),
                _num(c["precision"]),
                _num(c["confidence"]),
                _num(c["overconfidence"]),
                _num(c["classwise_ece"], 4),
            ]
            for c in analysis.classes
        ],
        numeric=(1, 2, 3, 4, 5, 6, 7),
    )
    shown = analysis.suspects[:HTML_SUSPECTS]
    more = (
        f'<p class="meta">The first {HTML_SUSPECTS:,} of {len(analysis.suspects):,}; the suspects CSV holds all.</p>'
        if len(analysis.suspects) > HTML_SUSPECTS
        else ""
    )
    suspects = _table(
        ["rank", "row", "text", "given label", "suggested label", "p(suggested)", "p(given)"],
        [
            [
                str(i),
                str(x.row),
                escape(x.text),
                f'<span class="bad">{escape(x.given_label)}</span>',
                f'<span class="good">{escape(x.suggested_label)}</span>',
                _num(x.confidence),
                _num(x.given_probability),
            ]
            for i, x in enumerate(shown, start=1)
        ],
        numeric=(0, 1, 5, 6),
    )
    source = (
        "a cross-validated head on the run's features" if analysis.mode == "training" else "the run's own probabilities"
    )
    kind = analysis.mode.replace("_", "-")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tuneforge analysis: {escape(Path(analysis.source).name)}</title>
<style>{_CSS}</style></head><body>
<h1>Error analysis: {escape(Path(analysis.source).name)}</h1>
<p class="meta">run {escape(analysis.run)} · data {escape(analysis.source)} · {escape(kind)} data</p>
<div class="cards">{cards}</div>
{notes}
<h2>Most confused label pairs</h2>
{pairs if analysis.pairs else "<p>None: every text was answered with its given label.</p>"}
<h2>Most confident mistakes</h2>
{mistakes if analysis.mistakes else "<p>None.</p>"}
<h2>Calibration per class</h2>
<p class="meta">Worst first. Overconfidence: mean confidence when the run answers the label, minus its precision
there. Classwise ECE: over all texts, p(label) against how often the label is the given one.</p>
{classes}
<h2>Probable label errors</h2>
<p class="meta">Found by confident learning (cleanlab) from out-of-sample probabilities ({escape(source)}), most
probable first. Check each row: fix the label, or drop the row, then retrain.</p>
{suspects if analysis.suspects else "<p>None found.</p>"}
{more}
</body></html>
"""


def write_html(analysis: Analysis, path: Path | str) -> Path:
    path = Path(path)
    atomic_write_text(path, render_html(analysis))
    return path


def write_suspects_csv(suspects: Sequence[Suspect], path: Path | str) -> Path:
    """``text,given_label,suggested_label,confidence,row,given_label_probability``, most probable first."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(SUSPECT_COLUMNS)
            for x in suspects:
                writer.writerow(
                    [
                        x.text,
                        x.given_label,
                        x.suggested_label,
                        f"{x.confidence:.6f}",
                        x.row,
                        f"{x.given_probability:.6f}",
                    ]
                )

    atomic_write_with(path, write)
    return path


def check_data_out(path: Path | str) -> str:
    """The format of a data file to write (.csv or .jsonl), or a clear error."""
    fmt = DATA_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: write the data as .csv or .jsonl")
    return fmt


def write_without_suspects(
    data_path: Path | str, cfg: DataConfig, suspects: Sequence[Suspect], out: Path | str
) -> dict[str, Any]:
    """The labelled file as it was (texts not cleaned), minus the suspects' rows, with the same column names:
    train on it by pointing ``data.train`` at it. Returns the rows kept and dropped."""
    fmt = check_data_out(out)
    out = Path(out)
    if out.resolve() == Path(data_path).resolve():
        raise DataError(f"{out}: would overwrite the data it is made from; write it to another file")
    raw = read_labelled_file(
        data_path, text_column=cfg.text_column, label_column=cfg.label_column, encoding=cfg.encoding, format=cfg.format
    )
    dropped = {x.row for x in suspects}
    keep = [i for i, row in enumerate(raw.rows) if row not in dropped]
    columns = (cfg.text_column, cfg.label_column)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            if fmt == "jsonl":
                for i in keep:
                    record = {columns[0]: raw.texts[i], columns[1]: raw.labels[i]}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                return
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([raw.texts[i], raw.labels[i]] for i in keep)

    atomic_write_with(out, write)
    return {"kept": len(keep), "dropped": len(raw.rows) - len(keep)}
