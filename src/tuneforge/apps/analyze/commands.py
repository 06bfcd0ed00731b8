"""``tuneforge analyze RUN --data FILE``: error analysis and probable label errors (wired in by tuneforge.cli).

Writes an HTML report (no network needed to open it) and a CSV of the suspect rows with a suggested label;
``--drop-suspects OUT`` also writes the data without them, to retrain on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from tuneforge.errors import TuneforgeError

# As tuneforge.apps.analyze.label_errors (not imported here: building the parser must stay light).
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
FORMS = ("auto", "model", "adapter", "onnx")
ANALYSIS_DIR = "analysis"


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="error analysis of a run on a labelled file (confused pairs, confident mistakes, calibration per "
        "class) and its probable label errors (cleanlab)",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, help="labelled file (default: the file the run trained on)")
    p.add_argument("--html", type=Path, metavar="REPORT", help="the report (default: RUN/analysis/<data>.html)")
    p.add_argument(
        "--suspects", type=Path, metavar="CSV", help="suspect rows (default: RUN/analysis/<data>-suspects.csv)"
    )
    p.add_argument(
        "--drop-suspects", type=Path, metavar="OUT", help="also write the data without the suspects (.csv or .jsonl)"
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--training-data",
        dest="mode",
        action="store_const",
        const="training",
        help="the run trained on this file: out-of-sample probabilities from a cross-validated head on its features "
        "(default when --data is the run's data.train)",
    )
    kind.add_argument(
        "--held-out",
        dest="mode",
        action="store_const",
        const="held_out",
        help="the run never trained on this file: use its own probabilities",
    )
    p.set_defaults(mode="auto")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for training data (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds (default 0)")
    p.add_argument(
        "--filter-by",
        choices=FILTERS,
        default="prune_by_noise_rate",
        help="cleanlab's rule for the suspect set (default prune_by_noise_rate)",
    )
    p.add_argument("--top", type=int, default=20, help="confused pairs and mistakes in the report (default 20)")
    p.add_argument(
        "--explain", type=int, default=5, metavar="N", help="explain the N most confident mistakes word by word"
    )
    p.add_argument("--text-column", help="default: the run's data.text_column")
    p.add_argument("--label-column", help="default: the run's data.label_column")
    p.add_argument("--encoding", help="default: the run's data.encoding")
    p.add_argument("--form", choices=FORMS, default="auto", help="which saved model")
    p.add_argument("--threads", type=int, help="CPU threads for the model")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--no-progress", action="store_true")


def _default_data(run_dir: Path) -> Path:
    from tuneforge.rundir import open_run_dir

    config = open_run_dir(run_dir).config_or_none()
    if config is None:
        raise TuneforgeError(f"{run_dir}: no config.yaml, so its training file is unknown; give --data FILE")
    path = Path(config.data.train)
    if not path.is_file():
        raise TuneforgeError(f"{run_dir}: its training file {path} is not there any more; give --data FILE")
    return path


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path is checked before the model loads and the features are computed (minutes)."""
    from tuneforge.apps.analyze.report import check_data_out

    if args.html is not None and args.html.suffix.lower() not in (".html", ".htm"):
        raise TuneforgeError(f"--html: {args.html} is not an .html file")
    if args.suspects is not None and args.suspects.suffix.lower() != ".csv":
        raise TuneforgeError(f"--suspects: {args.suspects} is not a .csv file")
    if args.drop_suspects is not None:
        check_data_out(args.drop_suspects)


def run_analyze_command(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.apps.analyze import AnalyzeOptions, analyze
    from tuneforge.apps.analyze.report import write_html, write_suspects_csv, write_without_suspects

    _check_outputs(args)
    options = AnalyzeOptions(
        mode=args.mode,
        folds=args.folds,
        seed=args.seed,
        filter_by=args.filter_by,
        top=args.top,
        explain=args.explain,
        text_column=args.text_column,
        label_column=args.label_column,
        encoding=args.encoding,
        form=args.form,
        threads=args.threads,
    )
    options.check(lambda field: "--" + field.replace("_", "-"))  # before the model loads (minutes)
    data = args.data if args.data is not None else _default_data(args.run_dir)
    if args.drop_suspects is not None and args.drop_suspects.resolve() == Path(data).resolve():
        raise TuneforgeError(f"--drop-suspects: {args.drop_suspects} would overwrite the data it is made from")
    analysis = analyze(args.run_dir, data, options, show_progress=not args.no_progress, console=console)
    out_dir = Path(analysis.run) / ANALYSIS_DIR
    html = write_html(analysis, args.html or out_dir / f"{Path(data).stem}.html")
    suspects = write_suspects_csv(analysis.suspects, args.suspects or out_dir / f"{Path(data).stem}-suspects.csv")
    dropped = None
    if args.drop_suspects is not None:
        dropped = write_without_suspects(data, analysis.data_config, analysis.suspects, args.drop_suspects)
    if args.json:
        figures = analysis.to_dict()
        figures["files"] = {"html": str(html), "suspects": str(suspects)}
        if dropped is not None:
            figures["files"]["without_suspects"] = {"path": str(args.drop_suspects), **dropped}
        print(json.dumps(figures, indent=2, ensure_ascii=False))
        return 0
    s = analysis.summary
    print(
        f"accuracy {s['accuracy']:.2f}  macro-F1 {s['macro_f1']:.2f}  ECE {s['ece']:.4f}  (n={s['n']}, "
        f"{analysis.mode.replace('_', '-')} data)"
    )
    for pair in analysis.pairs[:5]:
        print(f"  confused: {pair.a} <-> {pair.b}  {pair.a_as_b} + {pair.b_as_a}")
    print(f"probable label errors: {len(analysis.suspects)} of {s['n']} rows")
    for note in analysis.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"report: {html}\nsuspects: {suspects}", highlight=False)
    if dropped is not None:
        console.print(
            f"without suspects: {args.drop_suspects} ({dropped['kept']} rows kept, {dropped['dropped']} dropped)",
            highlight=False,
        )
    return 0
