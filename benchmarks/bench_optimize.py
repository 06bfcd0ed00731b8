"""Model optimization on real data: every variant against the fp32 PyTorch model, in one run.

Fine-tunes the default model with the default config (or takes an existing run with --run), runs
`tuneforge optimize` on it, and prints the variant table measured on the run's validation split,
plus the test-set accuracy of the baseline, the chosen variant and the distilled student.

    python benchmarks/bench_optimize.py --dataset banking77 --run runs/peft-banking77/full
    python benchmarks/bench_optimize.py --dataset sst2 --set train.epochs=1

The datasets are read from ``$TUNEFORGE_DATA_DIR`` (default ``../shared/data``). Results are
appended to ``benchmarks/results/optimize.jsonl``; the report and frontier plot stay in the output
run directory (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench_data import DATASETS, RESULTS_DIR, ROOT, dataset
from tuneforge.config import apply_overrides, validate_config
from tuneforge.infer.evaluate import evaluate_file
from tuneforge.optimize.measure import Measurement, markdown_table, pick_variant
from tuneforge.optimize.pipeline import BASELINE, OptimizeOptions, optimize_run, remeasure
from tuneforge.train.loop import train

RESULTS = RESULTS_DIR / "optimize.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="banking77")
    parser.add_argument("--run", type=Path, help="an existing fine-tuned run (else one is trained)")
    parser.add_argument("--out", type=Path, help="where the chosen variant goes (default runs/optimized-DATASET)")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--distill-epochs", type=int, help="student's epochs (default: the run's epoch rule)")
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument(
        "--measure-only", action="store_true", help="re-measure the variants already in --out (a quiet machine)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    data = dataset(args.dataset)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.measure_only:
        out = args.out or ROOT / "runs" / f"optimized-{args.dataset}"
        measurements = remeasure(out)
        chosen, _ = pick_variant(measurements, baseline=BASELINE, max_drop=args.max_drop, target="latency")
        print(markdown_table(measurements, baseline=BASELINE, chosen=chosen.name))
        _record_ratios(args, out, measurements, chosen.name, mode="measure-only")
        return
    started = time.perf_counter()
    run = args.run
    if run is None:
        run = ROOT / "runs" / f"bench-{args.dataset}"
        raw = apply_overrides(data.config(run), args.overrides)
        train(validate_config(raw), overwrite=True, show_progress=False)
    train_minutes = (time.perf_counter() - started) / 60

    out = args.out or ROOT / "runs" / f"optimized-{args.dataset}"
    started = time.perf_counter()
    options = OptimizeOptions(
        max_drop=args.max_drop, distill_epochs=args.distill_epochs, recovery_epochs=args.recovery_epochs
    )
    result = optimize_run(run, out_dir=out, options=options, overwrite=True)
    optimize_minutes = (time.perf_counter() - started) / 60

    # The same held-out test set for the baseline, the chosen variant and the student.
    test_file = data.evaluation
    columns = {"text_column": data.text_column, "label_column": data.label_column}
    test = {
        "baseline": evaluate_file(run, test_file, out_dir=out / "evaluations-baseline", **columns)[0]["accuracy"],
        "chosen": evaluate_file(out, test_file, **columns)[0]["accuracy"],
    }
    if (out / "variants" / "distilled").is_dir():
        test["distilled"] = evaluate_file(out / "variants" / "distilled", test_file, **columns)[0]["accuracy"]
    by_name = {m.name: m for m in result.measurements}
    baseline, chosen = by_name["torch-fp32"], by_name[result.chosen]
    record = {
        "benchmark": "optimize",
        "dataset": args.dataset,
        "run": str(run),
        "chosen": result.chosen,
        "max_drop": args.max_drop,
        "throughput_ratio": round(chosen.throughput_bs32 / baseline.throughput_bs32, 2),
        "size_ratio": round(baseline.size_mb / chosen.size_mb, 2),
        "validation_accuracy_drop": round(baseline.accuracy - chosen.accuracy, 2),
        "test_accuracy": test,
        "distilled_keeps": (round(100 * test["distilled"] / test["baseline"], 1) if "distilled" in test else None),
        "measurements": [m.to_dict() for m in result.measurements],
        "train_minutes": round(train_minutes, 1),
        "optimize_minutes": round(optimize_minutes, 1),
        "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print((out / "optimize_report.md").read_text())
    print(json.dumps({k: v for k, v in record.items() if k != "measurements"}, indent=2))


def _record_ratios(
    args: argparse.Namespace, out: Path, measurements: list[Measurement], chosen: str, mode: str
) -> None:
    by_name = {m.name: m for m in measurements}
    baseline, best = by_name[BASELINE], by_name[chosen]
    record = {
        "benchmark": "optimize",
        "mode": mode,
        "dataset": args.dataset,
        "out": str(out),
        "chosen": chosen,
        "max_drop": args.max_drop,
        "throughput_ratio": round(best.throughput_bs32 / baseline.throughput_bs32, 2),
        "size_ratio": round(baseline.size_mb / best.size_mb, 2),
        "validation_accuracy_drop": round(baseline.accuracy - best.accuracy, 2),
        "measurements": [m.to_dict() for m in measurements],
        "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "measurements"}, indent=2))


if __name__ == "__main__":
    main()
