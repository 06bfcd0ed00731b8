"""``tuneforge intent fit | add | remove | show``: the intent engine's command line (wired in by tuneforge.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from tuneforge.errors import TuneforgeError
from tuneforge.infer.openset import METHODS, load_detector


def add_intent_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("intent", help="intent engine: out-of-scope detection, ambiguity, intents added from examples")
    intent = p.add_subparsers(dest="intent_command", required=True)

    q = intent.add_parser("fit", help="fit the out-of-scope detector of a trained run (written into RUN/intent/)")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--data", type=Path, help="held-out labelled texts, OOS ones included (default: validation split)")
    q.add_argument("--method", choices=["auto", *METHODS], default="auto", help="score (default auto: see the docs)")
    q.add_argument("--oos-label", help="label of the out-of-scope texts in --data (default: oos, if present)")
    q.add_argument("--target-recall", type=float, default=0.95, help="in-scope recall the threshold keeps")
    q.add_argument("--ambiguity-margin", type=float, default=0.25, help="top-2 probability gap below which: ambiguous")
    q.add_argument("--json", action="store_true", help="print the detector's figures as JSON")

    q = intent.add_parser("add", help="add an intent from a handful of examples, without retraining")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--label", required=True, help="name of the new intent")
    q.add_argument("--examples", type=Path, required=True, help=".txt (one per line) or CSV/JSONL with a text column")
    q.add_argument("--text-column", default="text")

    q = intent.add_parser("remove", help="remove an intent added with intent add")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--label", required=True)

    q = intent.add_parser("show", help="the run's detector: method, thresholds, validation figures, added intents")
    q.add_argument("run_dir", type=Path)


def run_intent_command(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.apps.intent import FitOptions, add_intent, fit_detector, remove_intent
    from tuneforge.infer.stream import read_texts

    if args.intent_command == "fit":
        options = FitOptions(
            method=args.method,
            oos_label=args.oos_label,
            target_recall=args.target_recall,
            ambiguity_margin=args.ambiguity_margin,
        )
        detector = fit_detector(args.run_dir, data=args.data, options=options)
        if args.json:
            print(json.dumps(_summary(args.run_dir), indent=2, ensure_ascii=False))
            return 0
        validation = detector.info["validation"]
        console.print(
            f"[bold]{detector.method}[/bold] ({detector.info['chosen_by']}); threshold {detector.threshold:.4g}"
        )
        for method, figures in validation.items():
            shown = "  ".join(f"{key} {value}" for key, value in figures.items() if key != "threshold")
            console.print(f"  {method:<12} {shown}", highlight=False)
        console.print(f"written: {Path(args.run_dir) / 'intent'}")
        return 0
    if args.intent_command == "add":
        examples = read_texts(args.examples, text_column=args.text_column)
        detector = add_intent(args.run_dir, args.label, examples)
        console.print(f"added '{args.label}' from {len(detector.added[-1].examples)} examples")
        return 0
    if args.intent_command == "remove":
        remove_intent(args.run_dir, args.label)
        console.print(f"removed '{args.label}'")
        return 0
    print(json.dumps(_summary(args.run_dir), indent=2, ensure_ascii=False))
    return 0


def _summary(run_dir: Path) -> dict:
    from tuneforge.rundir import open_run_dir

    run = open_run_dir(run_dir)
    detector = load_detector(run.path, run.labels())
    if detector is None:
        raise TuneforgeError(f"{run.path}: no out-of-scope detector; run tuneforge intent fit first")
    return {
        "method": detector.method,
        "threshold": detector.threshold,
        "feature_threshold": detector.feature_threshold,
        "ambiguity_margin": detector.ambiguity_margin,
        "oos_label": detector.oos_label,
        "added": {intent.label: len(intent.examples) for intent in detector.added},
        **detector.info,
    }
