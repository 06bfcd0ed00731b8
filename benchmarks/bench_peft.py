"""Which fine-tuning method should I use? Full fine-tuning against LoRA, AdaLoRA, a bottleneck adapter and IA3.

Every method trains the default model with the default config and the same number of epochs, each in
its own fresh process (so peak memory is its own), then scores the evaluation split. Prints one table:
trainable parameters (count and %), accuracy, macro-F1, train samples/s, peak memory (RSS) and the
size on disk of what the method adds to the base model.

    python benchmarks/bench_peft.py --dataset banking77 --epochs 6 [--keep runs/peft-banking77]
    python benchmarks/bench_peft.py --dataset sst2 --subsample 10000 --epochs 2 --methods full,lora

The datasets are read from ``$TUNEFORGE_DATA_DIR`` (default ``../shared/data``). Results are
appended as JSON lines to ``benchmarks/results/peft.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_data import append_result

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("TUNEFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results" / "peft.jsonl"
DATASETS = {
    # name: (train file, evaluation file, text column, label column)
    "sst2": ("sst2/train.tsv", "sst2/dev.tsv", "sentence", "label"),
    "banking77": ("banking77/train.csv", "banking77/test.csv", "text", "category"),
}
METHODS = ["full", "lora", "adalora", "adapter", "ia3"]


def _folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}")) if folder.is_dir() else 0


def run_one(
    dataset: str, method: str, epochs: int, subsample: int | None, overrides: list[str], keep: Path | None = None
) -> dict:
    """Train one method in this process and return its row (called in a child process)."""
    import torch

    from tuneforge.config import apply_overrides, validate_config
    from tuneforge.train.loop import train

    train_file, eval_file, text_col, label_col = DATASETS[dataset]
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = (keep / method) if keep else Path(tmp) / "run"
        raw = {
            "data": {
                "train": str(DATA_DIR / train_file),
                "test": str(DATA_DIR / eval_file),
                "text_column": text_col,
                "label_column": label_col,
                "max_train_rows": subsample,
            },
            "train": {"epochs": epochs},
            "finetune": {"method": method},
            "output": {"dir": str(run_dir)},
        }
        apply_overrides(raw, overrides)
        config = validate_config(raw)
        started = time.perf_counter()
        result = train(config, overwrite=True, show_progress=False)
        wall = time.perf_counter() - started
        run = result.run_dir
        added_bytes = _folder_bytes(run / "adapter") if method != "full" else _folder_bytes(run / "model")
    metrics, stats = result.metrics["test"], result.metrics["train"]
    return {
        "method": method,
        "trainable_parameters": stats["trainable_parameters"],
        "total_parameters": stats["total_parameters"],
        "trainable_percent": round(100 * stats["trainable_parameters"] / stats["total_parameters"], 3),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "samples_per_second": stats["samples_per_second"],
        "epochs_completed": stats["epochs_completed"],
        "best_step": stats["best_step"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "saved_mb": round(added_bytes / 2**20, 2),
        "wall_minutes": round(wall / 60, 2),
        "config": config.model_dump(mode="json"),
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | % | accuracy | macro-F1 | train samples/s | peak RSS MB | saved MB | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_parameters']:,} | {r['trainable_percent']:.2f} | {r['accuracy']:.2f} "
            f"| {r['macro_f1']:.2f} | {r['samples_per_second']:.1f} | {r['peak_rss_mb']:.0f} | {r['saved_mb']:.2f} "
            f"| {r['wall_minutes']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="banking77")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--epochs", type=int, default=6, help="the same for every method")
    parser.add_argument("--subsample", type=int, default=None, help="seeded stratified subsample of train")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, help="keep each method's run directory under KEEP/<method>")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its row
    args = parser.parse_args()
    if args.one:
        print(
            "ROW " + json.dumps(run_one(args.dataset, args.one, args.epochs, args.subsample, args.overrides, args.keep))
        )
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}")
    for path in (DATA_DIR / DATASETS[args.dataset][0], DATA_DIR / DATASETS[args.dataset][1]):
        if not path.is_file():
            raise SystemExit(f"{path}: not found; set TUNEFORGE_DATA_DIR to the folder holding {args.dataset}/")
    rows = []
    for method in methods:
        command = [sys.executable, __file__, "--dataset", args.dataset, "--epochs", str(args.epochs), "--one", method]
        command += ["--subsample", str(args.subsample)] if args.subsample else []
        command += ["--keep", str(args.keep.resolve())] if args.keep else []
        command += [item for override in args.overrides for item in ("--set", override)]
        print(f"== {method}", flush=True)
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        row_lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
        if child.returncode != 0 or not row_lines:
            print(child.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method}: failed with exit code {child.returncode}")
        row = json.loads(row_lines[-1][4:])
        rows.append(row)
        print(_table([row]).splitlines()[-1], flush=True)
    record = {
        "benchmark": "peft",
        "dataset": args.dataset,
        "epochs": args.epochs,
        "subsample": args.subsample,
        "overrides": args.overrides,
        "rows": rows,
    }
    append_result(RESULTS, record)
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
