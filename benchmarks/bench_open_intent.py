"""Open-intent benchmark on Banking77: the protocol of Zhang et al. (ADB, AAAI 2021).

For each share of known intents (25%, 50%, 75%) and each seed, a seeded draw of Banking77's intents is
"known": tuneforge trains on the known intents' training texts only (default model, default config),
then ``tuneforge intent fit`` fits the out-of-scope detector on that run (threshold for 95% in-scope
recall on the run's validation split, no OOS examples), and the whole test set is scored with every
unseen intent's texts labelled ``oos``. Reported per score method: open-set accuracy and macro-F1 over
known + open, AUROC, OOS recall at 95% in-scope recall.

Two phases, so the long part can run first and the cheap part again as often as needed:

    python benchmarks/bench_open_intent.py --phase train --known 0.5,0.75 --seeds 0,1,2
    python benchmarks/bench_open_intent.py --phase evaluate --known 0.5,0.75 --seeds 0,1,2

Training is resumable: a finished run (``metrics.json`` present) is kept. Runs and split files live in
``benchmarks/results/open_intent/`` (ignored by git); results are appended to
``benchmarks/results/open_intent.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from bench_data import RESULTS_DIR, append_result, dataset

RESULTS = RESULTS_DIR / "open_intent.jsonl"
WORK = RESULTS_DIR / "open_intent"
OOS_LABEL = "oos"


def known_intents(labels: list[str], share: float, seed: int) -> list[str]:
    """ADB's draw: ``int(share * n)`` intents sampled with the seed (from the sorted label list)."""
    pool = sorted(set(labels))
    return sorted(random.Random(seed).sample(pool, int(share * len(pool))))


def _read(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [(row[text_column], row[label_column]) for row in csv.DictReader(handle)]


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def setting_dir(share: float, seed: int) -> Path:
    return WORK / f"known{round(share * 100)}-seed{seed}"


def write_setting(share: float, seed: int) -> tuple[Path, Path, list[str]]:
    """The known intents' training file and the whole test set with unseen intents relabelled ``oos``."""
    data = dataset("banking77")
    train_rows = _read(data.train, data.text_column, data.label_column)
    test_rows = _read(data.evaluation, data.text_column, data.label_column)
    known = known_intents([label for _, label in train_rows], share, seed)
    keep = set(known)
    folder = setting_dir(share, seed)
    train, test = folder / "train.csv", folder / "test.csv"
    _write(train, [(text, label) for text, label in train_rows if label in keep])
    _write(test, [(text, label if label in keep else OOS_LABEL) for text, label in test_rows])
    (folder / "known.json").write_text(json.dumps(known, indent=1), encoding="utf-8")
    return train, test, known


def train_setting(share: float, seed: int) -> None:
    train, _, known = write_setting(share, seed)
    folder = setting_dir(share, seed)
    run = folder / "run"
    if (run / "metrics.json").is_file():
        print(f"{run}: trained already, kept")
        return
    config = folder / "config.json"  # JSON is YAML
    config.write_text(json.dumps({"data": {"train": str(train)}, "output": {"dir": str(run)}}), encoding="utf-8")
    print(f"training {run} on {len(known)} known intents", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuneforge", "train", str(config), "--overwrite", "--no-progress"], check=True)
    minutes = (time.perf_counter() - started) / 60
    (folder / "train_minutes.txt").write_text(f"{minutes:.2f}\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["train", "evaluate"], required=True)
    parser.add_argument("--known", default="0.25,0.5,0.75", help="comma-separated shares of known intents")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args = parser.parse_args()
    shares = [float(s) for s in args.known.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for share in shares:
        for seed in seeds:
            if args.phase == "train":
                train_setting(share, seed)
            else:
                evaluate_setting(share, seed)


def evaluate_setting(share: float, seed: int) -> None:
    raise SystemExit("the evaluate phase comes with the intent engine")


if __name__ == "__main__":
    main()
