"""Open-intent benchmark on Banking77: the protocol of Zhang et al. (ADB, AAAI 2021).

For each share of known intents (25%, 50%, 75%) and each seed, a seeded draw of Banking77's intents is
"known": tuneforge trains on the known intents' training texts only (default model, default config),
then ``tuneforge intent fit`` fits the out-of-scope detector on that run (threshold for 95% in-scope
recall on the run's validation split, no OOS examples), and the whole test set is scored with every
unseen intent's texts labelled ``oos``. Reported per score method: open-set accuracy and macro-F1 over
known + open, AUROC, OOS recall at 95% in-scope recall. ``--add-intents`` adds every unseen intent
from 10 training examples to a copy of the run (their recall, the known intents' accuracy before and
after); ``--optimize`` runs ``tuneforge optimize`` (which refits the detector on the chosen variant)
and scores the variant the same way.

Two phases, so the long part can run first and the cheap part again as often as needed:

    python benchmarks/bench_open_intent.py --phase train --known 0.5,0.75 --seeds 0,1,2
    python benchmarks/bench_open_intent.py --phase evaluate --known 0.5,0.75 --seeds 0,1,2 --add-intents

Training is resumable: a finished run (``metrics.json`` present) is kept. Runs and split files live in
``benchmarks/results/open_intent/`` (ignored by git); results are appended to
``benchmarks/results/open_intent.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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
    # A run killed part-way leaves ``run.partial/`` with its checkpoint: continue it rather than start over.
    restart = "--resume" if run.with_name(run.name + ".partial").is_dir() else "--overwrite"
    subprocess.run([sys.executable, "-m", "tuneforge", "train", str(config), restart, "--no-progress"], check=True)
    minutes = (time.perf_counter() - started) / 60
    (folder / "train_minutes.txt").write_text(f"{minutes:.2f}\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["train", "evaluate", "report"], required=True)
    parser.add_argument("--known", default="0.25,0.5,0.75", help="comma-separated shares of known intents")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--add-intents", action="store_true", help="evaluate: also add the unseen intents from 10 examples"
    )
    parser.add_argument(
        "--optimize", action="store_true", help="evaluate: also optimize each run and score the variant"
    )
    parser.add_argument("--optimize-args", default="", help="extra tuneforge optimize options: '--optimize-args=...'")
    args = parser.parse_args()
    shares = [float(s) for s in args.known.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.phase == "report":
        report(shares, seeds)
        return
    for share in shares:
        for seed in seeds:
            if args.phase == "train":
                train_setting(share, seed)
            else:
                evaluate_setting(share, seed, args.add_intents, args.optimize, tuple(args.optimize_args.split()))


def _method_results(predictor, detector, test_texts: list[str], test_labels: list[str]) -> dict[str, dict]:
    """Every score method on the test set, each with the threshold ``intent fit`` found for it."""
    import numpy as np

    from tuneforge.apps.intent import open_set_metrics

    logits, features = predictor.logits_and_features(test_texts)
    known = np.array([y != OOS_LABEL for y in test_labels])
    index = {label: i for i, label in enumerate(detector.labels)}
    closed = float(np.mean([logits[i].argmax() == index[y] for i, y in enumerate(test_labels) if y != OOS_LABEL]))
    results = {"closed_set_known_accuracy": round(100 * closed, 2), "n_known_test": int(known.sum())}
    for method, figures in detector.info["validation"].items():
        variant = dataclasses.replace(detector, method=method, threshold=figures["threshold"])
        decided = variant.decide(logits, features)
        scores = variant.scores(logits, features)
        metrics = open_set_metrics(test_labels, [d.label for d in decided], scores, OOS_LABEL, detector.labels)
        metrics["validation_in_scope_recall"] = figures["in_scope_recall"]
        results[method] = metrics
    return results


def evaluate_setting(
    share: float, seed: int, add_intents: bool, optimize: bool, optimize_args: tuple[str, ...] = ()
) -> None:
    from tuneforge.apps.intent import FitOptions, fit_detector, refit_like
    from tuneforge.infer.predictor import Predictor

    folder = setting_dir(share, seed)
    run = folder / "run"
    if not (run / "metrics.json").is_file():
        print(f"{run}: not trained; run --phase train first")
        return
    _, test, known = write_setting(share, seed)
    rows = _read(test, "text", "label")
    texts, labels = [t for t, _ in rows], [y for _, y in rows]
    # A knn detector keeps the training features, so that every method can be scored with it; then the
    # default detector, the one the run keeps (and the one timed).
    scoring = fit_detector(run, options=FitOptions(method="knn"))
    started = time.perf_counter()
    detector = fit_detector(run)
    fit_seconds = time.perf_counter() - started
    predictor = Predictor(run)
    result = {
        "known_share": share,
        "seed": seed,
        "known_intents": len(known),
        "chosen_method": detector.method,
        "fit_seconds": round(fit_seconds, 1),
        "train_minutes": float((folder / "train_minutes.txt").read_text())
        if (folder / "train_minutes.txt").is_file()
        else None,
        **_method_results(predictor, scoring, texts, labels),
    }
    if add_intents:
        result["added_intents"] = _added_intents(run, share, seed, known, texts, labels)
    if optimize:
        out = folder / "optimized"
        subprocess.run(
            [sys.executable, "-m", "tuneforge", "optimize", str(run), "--out", str(out), "--overwrite", *optimize_args],
            check=True,
        )
        report = json.loads((out / "optimize_report.json").read_text(encoding="utf-8"))
        variant_scoring = fit_detector(out, options=FitOptions(method="knn"))
        refit_like(out, run)  # back to the detector optimize fitted
        variant = Predictor(out)
        result["optimized"] = {
            "chosen": report["chosen"],
            "chosen_method": variant.detector.method if variant.detector else None,
            **_method_results(variant, variant_scoring, texts, labels),
        }
    print(json.dumps(append_result(RESULTS, result), indent=1))


def _added_intents(run: Path, share: float, seed: int, known: list[str], texts: list[str], labels: list[str]) -> dict:
    """Add every unseen intent from 10 of its training texts (seeded) to a copy of the run: their recall on
    the test set, and the known intents' in-scope accuracy before and after."""
    import shutil
    import tempfile

    from tuneforge.apps.intent import add_intent
    from tuneforge.infer.predictor import Predictor

    data = dataset("banking77")
    train_rows = _read(data.train, data.text_column, data.label_column)
    test_rows = _read(data.evaluation, data.text_column, data.label_column)
    unseen = sorted({y for _, y in train_rows} - set(known))
    rng = random.Random(1000 + seed)
    examples = {intent: rng.sample([t for t, y in train_rows if y == intent], 10) for intent in unseen}
    true_intents = [y for _, y in test_rows]  # the test rows in the same order, unseen intents by name
    known_set = set(known)

    def known_accuracy(predictions) -> float:
        pairs = [(p.label, y) for p, y in zip(predictions, true_intents, strict=True) if y in known_set]
        return round(100 * sum(a == b for a, b in pairs) / len(pairs), 2)

    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(shutil.copytree(run, Path(scratch) / "run"))
        before = Predictor(copy).predict(texts)
        started = time.perf_counter()
        for intent in unseen:
            add_intent(copy, intent, examples[intent])
        add_seconds = time.perf_counter() - started
        after = Predictor(copy).predict(texts)
    recalls = {}
    for intent in unseen:
        hits = [p.label == intent for p, y in zip(after, true_intents, strict=True) if y == intent]
        recalls[intent] = round(100 * sum(hits) / len(hits), 2)
    return {
        "added": len(unseen),
        "examples_each": 10,
        "mean_recall": round(sum(recalls.values()) / len(recalls), 2),
        "recall_per_intent": recalls,
        "known_accuracy_before": known_accuracy(before),
        "known_accuracy_after": known_accuracy(after),
        "seconds_to_add_all": round(add_seconds, 1),
    }


METHODS = ("msp", "energy", "mahalanobis", "knn")
COLUMNS = (
    ("open_set_accuracy", "open-set acc."),
    ("open_set_macro_f1", "macro-F1 (known + open)"),
    ("auroc", "AUROC"),
    ("oos_recall_at_95_in_scope_recall", "OOS recall @95% in-scope"),
    ("in_scope_accuracy", "in-scope acc."),
    ("oos_recall", "OOS recall"),
)


def report(shares: list[float], seeds: list[int]) -> None:
    """Markdown tables: the latest result of each (share, seed), mean ± std over seeds, per method."""
    import statistics

    latest: dict[tuple[float, int], dict] = {}
    for line in RESULTS.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        latest[(record["known_share"], record["seed"])] = record
    for share in shares:
        records = [latest[(share, seed)] for seed in seeds if (share, seed) in latest]
        if not records:
            continue
        closed = [r["closed_set_known_accuracy"] for r in records]
        print(
            f"\n{round(share * 100)}% known intents, seeds {[r['seed'] for r in records]}: closed-set accuracy on the "
            f"known intents' test texts {statistics.mean(closed):.2f}"
        )
        print("| method | " + " | ".join(title for _, title in COLUMNS) + " |")
        print("|---|" + "---:|" * len(COLUMNS))
        for method in METHODS:
            cells = []
            for key, _ in COLUMNS:
                values = [r[method][key] for r in records]
                spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.2f}{spread}")
            print(f"| {method} | " + " | ".join(cells) + " |")
        added = [r["added_intents"] for r in records if "added_intents" in r]
        if added:
            print(
                f"added intents ({added[0]['added']} per run, 10 examples each): mean recall "
                f"{statistics.mean(a['mean_recall'] for a in added):.2f}; known in-scope accuracy "
                f"{statistics.mean(a['known_accuracy_before'] for a in added):.2f} before, "
                f"{statistics.mean(a['known_accuracy_after'] for a in added):.2f} after"
            )


if __name__ == "__main__":
    main()
