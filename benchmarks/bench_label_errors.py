"""Label-error benchmark: flip a share of the training labels, find them with ``tuneforge analyze``, retrain
without the suspects.

For a seed, ``--noise`` (default 5%) of the training rows get a label drawn uniformly from the other labels
(seeded); which rows were flipped is kept beside the data. Then, each step with ``tuneforge`` itself:

1. ``clean``: the default config on the original training file (the accuracy the noise costs is measured
   against it; skip it with ``--conditions noisy,cleaned --clean-accuracy A`` when known);
2. ``noisy``: the same config on the noisy file;
3. ``tuneforge analyze noisy-run --data noisy.csv --training-data --drop-suspects cleaned.csv``: the finder's
   precision and recall on the flipped rows, for cleanlab's set and for the top-k (k = rows flipped);
4. ``cleaned``: the same config on the noisy file without the suspects.

The issue's targets: precision >= 0.7 at recall >= 0.7, and ``cleaned`` recovering at least half of what the
noise cost: (cleaned - noisy) / (clean - noisy) >= 0.5 on test accuracy. Runs are resumable (a finished
run is kept, an interrupted one resumes); results are appended to ``benchmarks/results/label_errors.jsonl``.

    python benchmarks/bench_label_errors.py --dataset banking77 --noise 0.05 --seed 0
    python benchmarks/bench_label_errors.py --smoke   # 4 labels x 24 texts, 1 epoch: checks the plumbing only
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench_data import DATA_DIR, RESULTS_DIR, append_result, dataset

RESULTS = RESULTS_DIR / "label_errors.jsonl"
WORK = RESULTS_DIR / "label_errors"
CONDITIONS = ("clean", "noisy", "cleaned")
DEFAULT_FILTER = "prune_by_noise_rate"
SMOKE_LABELS, SMOKE_PER_LABEL = 4, 24


def _read(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [(row[text_column], row[label_column]) for row in csv.DictReader(handle)]


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def _smoke_subset(train: list[tuple[str, str]], test: list[tuple[str, str]], seed: int):
    labels = sorted({label for _, label in train})[:SMOKE_LABELS]
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in train:
        by_label[row[1]].append(row)
    small = [row for label in labels for row in rng.sample(by_label[label], SMOKE_PER_LABEL)]
    # The test file is sorted by label: ten of each, not the first forty.
    return small, [row for label in labels for row in [r for r in test if r[1] == label][:10]]


def write_setting(args: argparse.Namespace) -> Path:
    """clean.csv, noisy.csv (with flipped.json: the 1-based data rows whose label was changed) and test.csv."""
    data = dataset(args.dataset)
    name = f"{args.dataset}-noise{args.noise:g}-seed{args.seed}" + ("-smoke" if args.smoke else "")
    folder = WORK / name
    if (folder / "flipped.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    train = _read(data.train, data.text_column, data.label_column)
    test = _read(data.evaluation, data.text_column, data.label_column)
    if args.smoke:
        train, test = _smoke_subset(train, test, args.seed)
    labels = sorted({label for _, label in train})
    rng = random.Random(args.seed)
    flipped = sorted(rng.sample(range(len(train)), round(args.noise * len(train))))
    noisy = list(train)
    for i in flipped:
        text, label = train[i]
        noisy[i] = (text, rng.choice([other for other in labels if other != label]))
    _write(folder / "clean.csv", train)
    _write(folder / "noisy.csv", noisy)
    _write(folder / "test.csv", test)
    flips = {"rows": [i + 1 for i in flipped], "original": [train[i][1] for i in flipped]}
    (folder / "flipped.json").write_text(json.dumps(flips), encoding="utf-8")
    return folder


def _config(folder: Path, condition: str, train_file: Path, args: argparse.Namespace) -> Path:
    raw: dict[str, Any] = {
        "model": {"name": args.model},
        "data": {"train": str(train_file), "test": str(folder / "test.csv")},
        "train": {"seed": 42},
        "output": {"dir": str(folder / condition)},
    }
    if args.smoke:
        raw["train"].update({"epochs": 1, "threads": 2})
        raw["data"]["validation_size"] = 0.25
    path = folder / f"{condition}.json"  # JSON is YAML
    path.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return path


def train(folder: Path, condition: str, train_file: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train (or keep) the condition's run; its test accuracy and macro-F1."""
    run = folder / condition
    if not (run / "metrics.json").is_file():
        config = _config(folder, condition, train_file, args)
        interrupted = run.with_name(run.name + ".partial").is_dir()
        print(f"training {run}" + (" (resuming)" if interrupted else ""), flush=True)
        command = [sys.executable, "-m", "tuneforge", "train", str(config), "--no-progress"]
        subprocess.run([*command, "--resume" if interrupted else "--overwrite"], check=True)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return {key: metrics["test"][key] for key in ("accuracy", "macro_f1")}


def _named(folder: Path, stem: str, suffix: str, args: argparse.Namespace) -> Path:
    """``stem`` + ``suffix`` in ``folder``; a rule other than the default gets its own files and runs."""
    rule = "" if args.filter_by == DEFAULT_FILTER else f"-{args.filter_by}"
    return folder / f"{stem}{rule}{suffix}"


def find(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``tuneforge analyze`` on the noisy run's training file: the suspects against the flipped rows."""
    analysis, suspects_csv = _named(folder, "analysis", ".json", args), _named(folder, "suspects", ".csv", args)
    if not analysis.is_file():
        started = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable, "-m", "tuneforge", "analyze", str(folder / "noisy"),
                "--data", str(folder / "noisy.csv"), "--training-data", "--folds", str(args.folds),
                "--filter-by", args.filter_by, "--html", str(_named(folder, "analysis", ".html", args)),
                "--suspects", str(suspects_csv), "--drop-suspects", str(_named(folder, "cleaned", ".csv", args)),
                "--json", "--no-progress",
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        figures = json.loads(out.stdout)
        figures["minutes"] = round((time.perf_counter() - started) / 60, 2)
        analysis.write_text(json.dumps(figures, indent=1), encoding="utf-8")
    figures = json.loads(analysis.read_text(encoding="utf-8"))
    flips = json.loads((folder / "flipped.json").read_text(encoding="utf-8"))
    flipped = set(flips["rows"])
    original = dict(zip(flips["rows"], flips["original"], strict=True))
    with suspects_csv.open(encoding="utf-8", newline="") as handle:
        suspects = list(csv.DictReader(handle))
    ranked = [int(row["row"]) for row in suspects]
    found = set(ranked)
    top = set(ranked[: len(flipped)])
    hits = found & flipped
    suggested = {int(row["row"]): row["suggested_label"] for row in suspects}
    return {
        "flipped": len(flipped),
        "suspects": len(found),
        "precision": round(len(hits) / len(found), 4) if found else None,
        "recall": round(len(hits) / len(flipped), 4) if flipped else None,
        # Top-k: the k most probable suspects, k = the rows flipped (precision = recall there).
        "top_k_precision": round(len(top & flipped) / len(flipped), 4) if flipped else None,
        "top_k_considered": min(len(ranked), len(flipped)),
        "suggestion_restores_label": round(sum(suggested[r] == original[r] for r in hits) / len(hits), 4)
        if hits
        else None,
        "analyze_minutes": figures.get("minutes"),
        "noisy_train_accuracy_self": figures["summary"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["banking77"], default="banking77")
    parser.add_argument("--noise", type=float, default=0.05, help="share of training labels flipped")
    parser.add_argument("--seed", type=int, default=0, help="which rows are flipped, and to what")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--filter-by", default=DEFAULT_FILTER, help="cleanlab's rule; another than the default names its own files"
    )
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--clean-accuracy", type=float, help="test accuracy of the clean run, if not trained here")
    parser.add_argument("--smoke", action="store_true", help="4 labels x 24 texts, 1 epoch: the plumbing only")
    args = parser.parse_args()
    if not DATA_DIR.is_dir():
        raise SystemExit(f"{DATA_DIR}: not found; set TUNEFORGE_DATA_DIR")
    conditions = args.conditions.split(",")
    folder = write_setting(args)
    scores: dict[str, dict[str, float]] = {}
    if "clean" in conditions:
        scores["clean"] = train(folder, "clean", folder / "clean.csv", args)
    scores["noisy"] = train(folder, "noisy", folder / "noisy.csv", args)
    finder = find(folder, args)
    if "cleaned" in conditions:
        cleaned = _named(folder, "cleaned", "", args)
        scores["cleaned"] = train(folder, cleaned.name, cleaned.with_suffix(".csv"), args)
    clean = scores["clean"]["accuracy"] if "clean" in scores else args.clean_accuracy
    recovered = None
    if clean is not None and "cleaned" in scores and clean > scores["noisy"]["accuracy"]:
        cost = clean - scores["noisy"]["accuracy"]
        recovered = round((scores["cleaned"]["accuracy"] - scores["noisy"]["accuracy"]) / cost, 4)
    record = {
        "dataset": args.dataset,
        "noise": args.noise,
        "seed": args.seed,
        "model": args.model,
        "smoke": args.smoke,
        "folds": args.folds,
        "filter_by": args.filter_by,
        "finder": finder,
        "test": scores,
        "clean_accuracy": clean,
        "recovered": recovered,
    }
    # A smoke run checks the plumbing: its figures mean nothing and stay out of the real results.
    append_result(RESULTS.with_name("label_errors_smoke.jsonl") if args.smoke else RESULTS, record)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
