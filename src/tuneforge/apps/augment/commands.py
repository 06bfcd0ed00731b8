"""``tuneforge augment FILE|CONFIG --out FILE``: the augmentation command line (wired in by tuneforge.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from tuneforge.data.augment import CJK_UNITS, DEFAULT_RATE, MODEL_FREE_OPERATIONS, OPERATIONS

# As tuneforge.augment.paraphrase.ENGINES (not imported here: building the parser must stay light);
# tests/test_paraphrase.py checks the two agree.
PARAPHRASE_ENGINES = ("auto", "llama_cpp", "transformers")

CONFIG_SUFFIXES = (".yaml", ".yml")


def add_augment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "augment",
        help="write a labelled file plus augmented copies (EDA, typos, embedding neighbours, paraphrases), "
        "label-filtered",
    )
    p.add_argument("input", type=Path, help="a labelled .csv/.tsv/.jsonl/.parquet file, or a config (its data.train)")
    p.add_argument("--out", type=Path, required=True, help=".csv, .tsv or .jsonl; the report goes beside it")
    p.add_argument(
        "--ops",
        default=",".join(MODEL_FREE_OPERATIONS),
        help=f"comma-separated operations from {', '.join(OPERATIONS)} (default: all but neighbour and paraphrase)",
    )
    p.add_argument("--copies", type=int, default=1, help="augmented copies per text and operation (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help=f"share of words changed per copy (default {DEFAULT_RATE})"
    )
    p.add_argument(
        "--cjk-units",
        choices=CJK_UNITS,
        default="characters",
        help="what swap, delete and insert act on in CJK text: characters (default) or Chinese words (jieba)",
    )
    p.add_argument("--balance-below", type=int, metavar="N", help="augment only classes with fewer than N texts")
    p.add_argument("--filter-run", type=Path, metavar="RUN", help="keep a copy only if this run still labels it so")
    p.add_argument(
        "--min-probability", type=float, default=0.5, help="probability of its label a copy needs (default 0.5)"
    )
    p.add_argument(
        "--neighbour-model",
        metavar="RUN_OR_MODEL",
        help="word embeddings for the neighbour operation: a run directory or a model name (default: --filter-run)",
    )
    p.add_argument("--neighbours", type=int, default=5, help="nearest neighbours a word is replaced from (default 5)")
    p.add_argument(
        "--paraphrase-engine",
        choices=PARAPHRASE_ENGINES,
        default="auto",
        help="for the paraphrase operation: llama_cpp, transformers (slower), or auto (llama_cpp when installed)",
    )
    p.add_argument("--text-column", help="default: text, or the config's data.text_column")
    p.add_argument("--label-column", help="default: label, or the config's data.label_column")
    p.add_argument("--encoding", help="default: utf-8, or the config's data.encoding")
    p.add_argument("--no-progress", action="store_true")


def run_augment_command(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.augment.pipeline import AugmentOptions, augment_file, report_path

    path: Path = args.input
    text_column, label_column, encoding, fmt = "text", "label", "utf-8", "auto"
    if path.suffix.lower() in CONFIG_SUFFIXES:
        from tuneforge.config import load_config

        data = load_config(path).data
        path = data.train
        text_column, label_column, encoding, fmt = data.text_column, data.label_column, data.encoding, data.format
    options = AugmentOptions(
        operations=tuple(args.ops.split(",")),
        copies=args.copies,
        seed=args.seed,
        rate=args.rate,
        balance_below=args.balance_below,
        filter_run=args.filter_run,
        min_probability=args.min_probability,
        neighbour_model=args.neighbour_model,
        neighbours=args.neighbours,
        paraphrase_engine=args.paraphrase_engine,
        cjk_units=args.cjk_units,
    )
    result = augment_file(
        path,
        args.out,
        options,
        text_column=args.text_column or text_column,
        label_column=args.label_column or label_column,
        encoding=args.encoding or encoding,
        format=fmt,
        show_progress=not args.no_progress,
        console=console,
    )
    report = result.report
    print(json.dumps(report, indent=2, ensure_ascii=False))
    console.print(
        f"{report['originals']} originals + {report['augmented']} augmented -> {args.out} "
        f"(report: {report_path(args.out)})",
        highlight=False,
    )
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    return 0
