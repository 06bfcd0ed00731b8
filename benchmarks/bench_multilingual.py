"""Multilingual benchmark: which model for which language, measured on waimai_10k (Chinese) and Banking77.

For each model the same script trains tuneforge with the default config (only ``model.name`` differs)
in a child process, so that its peak memory is its own, and reports test accuracy, macro-F1, train
samples/s, wall time, inference samples/s (the Predictor on the test texts), peak RSS of training, and
the size of the run before and after ``tuneforge optimize``. A TF-IDF + logistic-regression baseline
runs on the same split: character 1-3 grams (and, with jieba installed, also jieba words).

waimai_10k has no official split: a seeded stratified 80/20 split is written under
``benchmarks/results/waimai/`` (ignored by git; the data itself is read from ``$TUNEFORGE_DATA_DIR``).

    python benchmarks/bench_multilingual.py --dataset waimai --models tfidf,minilm-l6,multilingual-e5-small
    python benchmarks/bench_multilingual.py --dataset banking77 --models multilingual-e5-small --optimize ''

Results are appended as JSON lines to ``benchmarks/results/multilingual.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_data import DATA_DIR, RESULTS_DIR, append_result, dataset
from tuneforge.data import read_labelled_file

RESULTS = RESULTS_DIR / "multilingual.jsonl"
SPLIT_SEED = 42


def waimai_split() -> tuple[Path, Path]:
    """Seeded stratified 80/20 split of waimai_10k (rows are sorted by label in the file)."""
    from sklearn.model_selection import train_test_split

    source = DATA_DIR / "waimai_10k" / "waimai_10k.csv"
    if not source.is_file():
        raise SystemExit(f"{source}: not found; set TUNEFORGE_DATA_DIR")
    out = RESULTS_DIR / "waimai"
    train, test = out / "train.csv", out / "test.csv"
    if train.is_file() and test.is_file():
        return train, test
    with source.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    tr_x, te_x, tr_y, te_y = train_test_split(texts, labels, test_size=0.2, random_state=SPLIT_SEED, stratify=labels)
    out.mkdir(parents=True, exist_ok=True)
    for path, xs, ys in ((train, tr_x, tr_y), (test, te_x, te_y)):
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(zip(xs, ys, strict=True))
    return train, test


def split_files(name: str) -> tuple[Path, Path, str, str]:
    if name == "waimai":
        train, test = waimai_split()
        return train, test, "text", "label"
    data = dataset(name)
    return data.train, data.evaluation, data.text_column, data.label_column


def _read(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    data = read_labelled_file(path, text_column=text_column, label_column=label_column)
    return data.texts, data.labels


def run_tfidf(name: str) -> list[dict]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline, make_union

    train, test, text_column, label_column = split_files(name)
    tr_x, tr_y = _read(train, text_column, label_column)
    te_x, te_y = _read(test, text_column, label_column)
    setups = {"tfidf-char-1-3": make_union(TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True))}
    try:
        import jieba  # noqa: F401

        from tuneforge.data import segment_words

        def words(text: str) -> list[str]:
            return segment_words([text], "zh" if name == "waimai" else "en")[0]

        setups["tfidf-char-1-3+jieba-words"] = make_union(
            TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True),
            TfidfVectorizer(analyzer=words, sublinear_tf=True),
        )
    except ImportError:
        print("jieba not installed: word-level TF-IDF skipped (pip install 'tuneforge[zh]')")
    results = []
    for setup, features in setups.items():
        started = time.perf_counter()
        model = make_pipeline(features, LogisticRegression(C=10.0, max_iter=2000))
        model.fit(tr_x, tr_y)
        predicted = model.predict(te_x)
        results.append(
            {
                "model": setup,
                "accuracy": round(100 * accuracy_score(te_y, predicted), 2),
                "macro_f1": round(100 * f1_score(te_y, predicted, average="macro"), 2),
                "wall_minutes": round((time.perf_counter() - started) / 60, 2),
            }
        )
    return results


def _child(command: list[str]) -> tuple[float, float]:
    """Run a tuneforge command in a child process; its wall seconds and its own peak RSS (MiB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def _inference_rate(run: Path, texts: list[str]) -> float:
    from tuneforge.infer.predictor import Predictor

    predictor = Predictor(run, batch_size=64)
    predictor.predict_proba(texts[:64])  # warm-up
    started = time.perf_counter()
    predictor.predict_proba(texts)
    return len(texts) / (time.perf_counter() - started)


def _test_accuracy(run: Path, texts: list[str], labels: list[str]) -> float:
    from tuneforge.infer.predictor import Predictor

    predictor = Predictor(run, batch_size=64)
    predicted = [p.label for p in predictor.predict(texts)]
    return round(100 * sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels), 2)


def run_model(name: str, model: str, overrides: list[str], optimize: str, reuse: bool) -> dict:
    from tuneforge.optimize.measure import folder_size_mb
    from tuneforge.pretrained import resolve_model

    train, test, text_column, label_column = split_files(name)
    run = RESULTS_DIR / name / f"run-{model}"
    config = RESULTS_DIR / name / f"config-{model}.json"  # JSON is YAML
    config.write_text(
        json.dumps(
            {
                "model": {"name": model},
                "data": {
                    "train": str(train),
                    "test": str(test),
                    "text_column": text_column,
                    "label_column": label_column,
                },
                "output": {"dir": str(run)},
            }
        )
    )
    tuneforge = [sys.executable, "-m", "tuneforge"]
    wall = rss = None
    if not (reuse and (run / "metrics.json").is_file()):
        sets = [item for o in overrides for item in ("--set", o)]
        wall, rss = _child([*tuneforge, "train", str(config), "--overwrite", "--no-progress", *sets])
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    te_x, te_y = _read(test, text_column, label_column)
    result = {
        "model": model,
        "overrides": overrides,
        "accuracy": metrics["test"]["accuracy"],
        "macro_f1": metrics["test"]["macro_f1"],
        "train": metrics["train"],
        "train_wall_minutes": round(wall / 60, 2) if wall else None,
        "train_peak_rss_mib": round(rss) if rss else None,
        "inference_samples_per_s": round(_inference_rate(run, te_x), 1),
        "base_model_mb": folder_size_mb(Path(resolve_model(model))),
        "run_model_mb": folder_size_mb(run / "model"),
    }
    if optimize:
        out = run.with_name(run.name + "-optimized")
        seconds, rss_opt = _child(
            [
                *tuneforge,
                "optimize",
                str(run),
                "--out",
                str(out),
                "--overwrite",
                "--variants",
                optimize,
                "--max-drop",
                "1.0",
            ]
        )
        report = json.loads((out / "optimize_report.json").read_text(encoding="utf-8"))
        result["optimize"] = {
            "variants": optimize,
            "chosen": report["chosen"],
            "measurements": report["measurements"],
            "chosen_test_accuracy": _test_accuracy(out, te_x, te_y),
            "chosen_size_mb": next(m["size_mb"] for m in report["measurements"] if m["name"] == report["chosen"]),
            "inference_samples_per_s": round(_inference_rate(out, te_x), 1),
            "minutes": round(seconds / 60, 2),
            "peak_rss_mib": round(rss_opt),
        }
    return result


def _record(name: str, result: dict) -> None:
    print(json.dumps(append_result(RESULTS, {"dataset": name, **result}), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["waimai", "banking77", "sst2"], default="waimai")
    parser.add_argument("--models", default="tfidf,minilm-l6,multilingual-e5-small", help="comma-separated")
    parser.add_argument("--set", action="append", default=[], help="config override for every model, key=value")
    parser.add_argument(
        "--optimize", default="onnx-int8,trimmed-onnx-int8", help="variants for tuneforge optimize ('' to skip)"
    )
    parser.add_argument("--reuse", action="store_true", help="keep a finished run instead of training again")
    args = parser.parse_args()
    for model in args.models.split(","):
        if model == "tfidf":
            for result in run_tfidf(args.dataset):
                _record(args.dataset, result)
        else:
            _record(args.dataset, run_model(args.dataset, model, args.set, args.optimize, args.reuse))


if __name__ == "__main__":
    main()
