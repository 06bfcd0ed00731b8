"""Does `tuneforge lr-find`'s suggestion train as well as the hand-tuned default?

Runs the learning-rate range test with the default config on a dataset, then trains the default
config with the suggested body and head learning rates (everything else default), and compares the
accuracy with the tuned default's, read from the latest default-config record of
``bench_finetune.py --part accuracy`` (``benchmarks/results/finetune.jsonl``) or given with --reference.

    python benchmarks/bench_lr_find.py --dataset banking77

Results are appended to ``benchmarks/results/lr_find.jsonl``; the plot is kept next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench_data import DATASETS, RESULTS_DIR, dataset
from tuneforge.config import apply_overrides, validate_config
from tuneforge.train.loop import train
from tuneforge.train.lr_find import lr_range_test


def _reference(dataset: str) -> float | None:
    records = RESULTS_DIR / "finetune.jsonl"
    if not records.is_file():
        return None
    found = None
    for line in records.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("benchmark") == "accuracy" and record.get("dataset") == dataset and not record.get("overrides"):
            found = record["accuracy"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="banking77")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reference", type=float, help="accuracy of the tuned default (else read from records)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="applied to both the range test and the training (e.g. train.epochs=6, to match --reference)",
    )
    args = parser.parse_args()
    data = dataset(args.dataset)
    reference = args.reference if args.reference is not None else _reference(args.dataset)
    torch.set_num_threads(os.cpu_count() or 1)
    plot_dir = RESULTS_DIR / f"lr_find_{args.dataset}"
    with tempfile.TemporaryDirectory() as tmp:
        raw = apply_overrides(data.config(Path(tmp) / "run"), args.overrides)
        started = time.perf_counter()
        found = lr_range_test(validate_config(raw), steps=args.steps, out_dir=plot_dir, show_progress=False)
        find_seconds = time.perf_counter() - started
        raw["train"] = {
            **raw.get("train", {}),
            "learning_rate": found.suggestion,
            "head_learning_rate": found.head_suggestion,
        }
        started = time.perf_counter()
        result = train(validate_config(raw), show_progress=False)
        train_minutes = (time.perf_counter() - started) / 60
    accuracy = result.metrics["test"]["accuracy"]
    record = {
        "benchmark": "lr_find",
        "dataset": args.dataset,
        "overrides": args.overrides,
        "suggested_learning_rate": found.suggestion,
        "suggested_head_learning_rate": found.head_suggestion,
        "range_test_seconds": round(find_seconds, 1),
        "range_test_steps": len(found.lrs),
        "accuracy_with_suggestion": accuracy,
        "macro_f1_with_suggestion": result.metrics["test"]["macro_f1"],
        "tuned_default_accuracy": reference,
        "gap": None if reference is None else round(accuracy - reference, 2),
        "train_minutes": round(train_minutes, 1),
        "train": result.metrics["train"],
        "plot": str(plot_dir / "lr_find.png"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with (RESULTS_DIR / "lr_find.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
