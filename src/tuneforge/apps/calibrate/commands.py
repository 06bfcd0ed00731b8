"""``tuneforge calibrate RUN --data FILE``: the calibration command line (wired in by tuneforge.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a run's temperature on a labelled file, so that its probabilities are calibrated "
        "(RUN/calibration.json; every loader applies it)",
    )
    p.add_argument("run_dir", type=Path, help="a run directory or an optimized variant (PyTorch, ONNX, int8)")
    p.add_argument("--data", type=Path, required=True, help="labelled held-out texts (not the training texts)")
    p.add_argument("--text-column", help="default: the run's data.text_column")
    p.add_argument("--label-column", help="default: the run's data.label_column")
    p.add_argument("--encoding", help="default: the run's data.encoding")
    p.add_argument("--json", action="store_true", help="print the calibration as JSON")


def run_calibrate_command(args: argparse.Namespace, console: Console) -> int:
    from tuneforge.apps.calibrate.fit import calibrate_file

    result = calibrate_file(
        args.run_dir, args.data, text_column=args.text_column, label_column=args.label_column, encoding=args.encoding
    )
    calibration = result.calibration
    if args.json:
        print(json.dumps(calibration.to_dict(), indent=2, ensure_ascii=False))
    else:
        was = f" (was {result.previous_temperature:g})" if result.previous_temperature is not None else ""
        print(f"temperature {calibration.temperature:.4g}{was}  (n={calibration.fitted_on['texts']})")
        print(f"{'':<8}{'before':>10}{'after':>10}")
        for key in ("ece", "nll", "brier"):
            print(
                f"{key.upper() if key == 'ece' else key.capitalize():<8}"
                f"{calibration.before[key]:>10.4f}{calibration.after[key]:>10.4f}"
            )
        print(f"accuracy {calibration.after['accuracy']:.2f} (unchanged: the temperature never changes the top label)")
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"written: {', '.join(str(path) for path in result.written)}", highlight=False)
    return 0
