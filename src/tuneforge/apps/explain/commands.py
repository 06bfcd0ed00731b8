"""``tuneforge explain RUN "text"``: which words made a run answer as it did (wired in by tuneforge.cli).

Prints each text with its words highlighted (green: for the label, red: against), or one JSON object per
text with ``--json``; ``--file F --html report.html`` also writes a self-contained page (no network).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from tuneforge.errors import TuneforgeError

# As tuneforge.explain.METHODS (not imported here: building the parser must stay light), plus the short "ig".
METHOD_NAMES = {"occlusion": "occlusion", "ig": "integrated_gradients", "integrated_gradients": "integrated_gradients"}
FORMS = ("auto", "model", "adapter", "onnx")


def add_explain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="which words made a run answer as it did: occlusion (any form) or integrated gradients (PyTorch)",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("texts", nargs="*", help="texts to explain")
    p.add_argument("--file", type=Path, help="a .txt file (one text per line) or a CSV/TSV/JSONL/Parquet file")
    p.add_argument("--text-column", default="text", help="the column of --file holding the texts (default: text)")
    p.add_argument("--encoding", default="utf-8", help="encoding of --file (default utf-8)")
    p.add_argument(
        "--method",
        choices=sorted(METHOD_NAMES),
        default="occlusion",
        help="occlusion: leave each word out, all in one batch, any form (default); ig: integrated gradients, "
        "PyTorch forms only",
    )
    p.add_argument("--label", help="the label to explain (default: the model's best label for each text)")
    p.add_argument("--html", type=Path, metavar="REPORT", help="also write a self-contained HTML page")
    p.add_argument("--json", action="store_true", help="one JSON object per text instead of highlighted text")
    p.add_argument("--limit", type=int, metavar="N", help="explain at most the first N texts")
    p.add_argument("--steps", type=int, default=50, help="integrated gradients: points on the path (default 50)")
    p.add_argument("--form", choices=FORMS, default="auto", help="which saved model")
    p.add_argument("--threads", type=int, help="CPU threads for the model")


def _texts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(where, text) pairs, ``where`` naming an argument or a file's row for error messages."""
    from tuneforge.infer.stream import TextSource

    texts = [(f"text {i}", text) for i, text in enumerate(args.texts, start=1)]
    if args.file:
        source = TextSource(args.file, text_column=args.text_column, encoding=args.encoding)
        texts += [(f"{args.file}: row {row}", text) for row, text in source]
    if args.limit is not None:
        texts = texts[: args.limit]
    return texts


def run_explain_command(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.explain import MAX_WORDS, explain
    from tuneforge.explain.core import words_to_explain
    from tuneforge.explain.report import terminal_text, write_html_report

    if args.limit is not None and args.limit < 1:
        raise TuneforgeError(f"--limit: must be at least 1, got {args.limit}")
    if args.steps < 2:
        raise TuneforgeError(f"--steps: must be at least 2, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise TuneforgeError("--threads: must be at least 1")
    if args.html is not None and args.html.suffix.lower() not in (".html", ".htm"):
        raise TuneforgeError(f"--html: {args.html} is not an .html file")
    method = METHOD_NAMES[args.method]
    texts = _texts(args)
    if not texts:
        raise TuneforgeError("explain: give texts as arguments or --file FILE")
    # Every text is checked before the model loads (seconds): a bad row fails at once, naming itself.
    for where, text in texts:
        try:
            words_to_explain(text)
        except TuneforgeError as exc:
            raise TuneforgeError(f"{where}: {exc}") from None

    from tuneforge.infer.predictor import Predictor

    # A batch as large as the longest explanation: each text's n + 1 variants are one forward pass.
    predictor = Predictor(args.run_dir, threads=args.threads, form=args.form, batch_size=MAX_WORDS + 1, open_set=False)
    explanations = [explain(predictor, text, method=method, label=args.label, steps=args.steps) for _, text in texts]
    out = Console(soft_wrap=True, highlight=False)
    for explanation in explanations:
        if args.json:
            print(json.dumps({"text": explanation.text, **explanation.to_dict()}, ensure_ascii=False))
        else:
            out.print(terminal_text(explanation))
    if args.html is not None:
        about = f"Run {predictor.run.path.name} ({predictor.form}), {len(explanations)} text(s)"
        write_html_report(args.html, explanations, about=about)
        console.print(f"wrote {args.html}", highlight=False)
    return 0
