"""Low-data benchmark: a few labelled texts per label, the rest of the training set as unlabelled texts.

For each seed, ``--per-label`` training texts of every label are drawn (seeded) as the labelled set; the
other training texts, without their labels, are the unlabelled file. Each condition trains with
``tuneforge train`` on the same files and is scored on the dataset's test set:

- ``plain``: the labelled texts alone;
- ``augment``: plus ``data.augment`` (the five model-free operations, one copy each);
- ``self_training``: ``train.semi_supervised`` on the unlabelled file (rounds, threshold as set here);
- ``both``: augmentation and self-training.

``--selection proportional`` (with ``--fraction``) runs the self-training conditions with that pseudo-label
selection instead of the threshold; their runs and rows are named ``self_training-proportional`` and
``both-proportional``, so both selections are kept side by side.

``--teacher RUN`` has round 1 labelled by the seed's finished run ``RUN`` instead of the round-0 model
(``train.semi_supervised.teacher``): with ``--teacher both`` it is a second round of ``both`` that costs
one round, not two. Its runs and rows are named ``<condition>-from-<RUN>``.

``--agreement neighbour`` (or ``centroid``) keeps only the pseudo labels that the pretrained model's sentence
embeddings agree with (``train.semi_supervised.agreement``); its runs and rows get ``-agree-<view>``.

``--threshold T`` other than 0.7 names the self-training runs ``-t<T>``; ``--rounds N`` other than 1,
``-rounds<N>``.

``--keep last`` keeps each run's (and each round's) last epoch instead of its best on the small validation
split (``train.keep``); its runs and rows get ``-keep-last``.

``--cjk-units words`` augments Chinese text by whole words (jieba) instead of characters
(``data.augment.cjk_units``); the augmenting conditions' runs and rows get ``-words`` in their names.

Every condition gets the same budget of training examples seen per run (``train.min_train_samples``,
``--budget``): more texts mean fewer epochs, not more compute; self-training pays for each of its rounds.
Runs are resumable (a finished run is kept; an interrupted one resumes). Results are appended to
``benchmarks/results/low_data.jsonl``; ``--phase report`` prints the table.

    python benchmarks/bench_low_data.py --dataset banking77 --per-label 10 --seeds 0,1,2
    python benchmarks/bench_low_data.py --dataset banking77 --per-label 10 --seeds 0,1,2 --phase report
    python benchmarks/bench_low_data.py --dataset waimai --per-label 100 --seeds 0 --budget 5000 \
        --conditions plain,self_training --selection proportional --full 90.37
    python benchmarks/bench_low_data.py --dataset waimai --per-label 100 --seeds 0 --phase check-pseudo
    python benchmarks/bench_low_data.py --dataset banking77 --per-label 10 --seeds 1,2 --conditions both --teacher both

``--phase check-pseudo`` trains nothing: a finished run of the seed (``--labeller plain``) scores the
unlabelled texts and each selection's pseudo labels are checked against the labels the benchmark withheld.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench_data import DATA_DIR, RESULTS_DIR, append_result, dataset

RESULTS = RESULTS_DIR / "low_data.jsonl"
WORK = RESULTS_DIR / "low_data"
CONDITIONS = ("plain", "augment", "self_training", "both")
MODEL_FREE = ["swap", "delete", "insert", "typo", "case"]


def _source(name: str) -> tuple[Path, Path, str, str, str]:
    """(train file, test file, text column, label column, model name)."""
    if name == "waimai":
        # No official split: the multilingual benchmark's seeded 80/20 split, so the figures compare.
        from bench_multilingual import waimai_split

        train, test = waimai_split()
        return train, test, "text", "label", "multilingual-e5-small"
    data = dataset(name)
    return data.train, data.evaluation, data.text_column, data.label_column, "minilm-l6"


def _read(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [(row[text_column], row[label_column]) for row in csv.DictReader(handle)]


def write_setting(name: str, per_label: int, seed: int) -> Path:
    """The seed's labelled file (``per_label`` texts of each label) and unlabelled file (the rest, texts only)."""
    train, _, text_column, label_column, _ = _source(name)
    folder = WORK / f"{name}-{per_label}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = _read(train, text_column, label_column)
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(rows):
        by_label[label].append(index)
    rng = random.Random(seed)
    chosen = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], per_label))
    chosen_set = set(chosen)
    with (folder / "labelled.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows[i] for i in chosen)
    # One text a line: texts holding a line break go in the CSV form instead.
    with (folder / "unlabelled.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([rows[i][0]] for i in range(len(rows)) if i not in chosen_set)
    # The test set with the columns the labelled file has (the source's may be named otherwise).
    _, test, _, _, _ = _source(name)
    with (folder / "test.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(_read(test, text_column, label_column))
    return folder


#: train.semi_supervised.threshold's default; another threshold is named in the run's folder.
DEFAULT_THRESHOLD = 0.7


def _self_training(condition: str) -> bool:
    return condition in ("self_training", "both")


def _augmenting(condition: str) -> bool:
    return condition in ("augment", "both")


def run_name(condition: str, args: argparse.Namespace) -> str:
    """The condition's folder and row name: it says which augmentation units, selection and teacher it used."""
    name = condition
    if _augmenting(condition) and args.cjk_units == "words":
        name += "-words"
    if args.keep == "last":
        name += "-keep-last"
    if not _self_training(condition):
        return name
    if args.selection == "proportional":
        name += "-proportional"
    elif args.threshold != DEFAULT_THRESHOLD:
        name += f"-t{args.threshold}"
    if args.rounds != 1:
        name += f"-rounds{args.rounds}"
    if args.agreement != "none":
        name += f"-agree-{args.agreement}"
    return f"{name}-from-{args.teacher}" if args.teacher else name


def condition_config(name: str, folder: Path, condition: str, args: argparse.Namespace) -> dict[str, Any]:
    model = _source(name)[4]
    raw: dict[str, Any] = {
        "model": {"name": model},
        "data": {"train": str(folder / "labelled.csv"), "test": str(folder / "test.csv")},
        "train": {"min_train_samples": args.budget, "seed": 42, "keep": args.keep},
        "output": {"dir": str(folder / run_name(condition, args))},
    }
    if _augmenting(condition):
        raw["data"]["augment"] = {"operations": MODEL_FREE, "copies": 1, "cjk_units": args.cjk_units}
    if condition in ("self_training", "both"):
        raw["data"]["unlabeled"] = str(folder / "unlabelled.csv")
        semi: dict[str, Any] = {"rounds": args.rounds}
        if args.selection == "proportional":
            semi.update(selection="proportional", fraction=args.fraction)
        else:
            semi["threshold"] = args.threshold
        if args.teacher:
            semi["teacher"] = str(folder / args.teacher)
        if args.agreement != "none":
            semi["agreement"] = args.agreement
        raw["train"]["semi_supervised"] = semi
    return raw


def train_condition(name: str, folder: Path, condition: str, args: argparse.Namespace) -> None:
    run = folder / run_name(condition, args)
    if (run / "metrics.json").is_file():
        print(f"{run}: trained already, kept", flush=True)
        return
    config = folder / f"{run.name}.json"  # JSON is YAML
    config.write_text(json.dumps(condition_config(name, folder, condition, args), indent=1), encoding="utf-8")
    interrupted = any(run.with_name(run.name + suffix).is_dir() for suffix in (".partial", ".rounds"))
    print(f"training {run}" + (" (resuming)" if interrupted else ""), flush=True)
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "train",
            str(config),
            "--resume" if interrupted else "--overwrite",
            "--no-progress",
        ],
        check=True,
    )
    record = {
        "dataset": name,
        "per_label": args.per_label,
        "seed": folder.name.rsplit("seed", 1)[1],
        "condition": run.name,
        "budget": args.budget,
        "rounds": args.rounds if _self_training(condition) else None,
        "threshold": args.threshold if _self_training(condition) and args.selection == "threshold" else None,
        "fraction": args.fraction if _self_training(condition) and args.selection == "proportional" else None,
        "teacher": args.teacher if _self_training(condition) else None,
        "agreement": args.agreement if _self_training(condition) else None,
        "cjk_units": args.cjk_units if _augmenting(condition) else None,
        "keep": args.keep,
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "test": _test_scores(run),
        "self_training": _rounds(run),
        "pseudo_labels_right": _pseudo_labels_right(name, run),
    }
    append_result(RESULTS, record)


def _test_scores(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return {key: metrics["test"][key] for key in ("accuracy", "macro_f1")}


def withheld_labels(name: str) -> dict[str, str]:
    """Every training text's true label, keyed as training matches texts (case, width and spacing aside:
    reading the data tidies some texts), to check pseudo labels against."""
    from tuneforge.data import normalise_for_matching

    train, _, text_column, label_column, _ = _source(name)
    truth: dict[str, str] = {}
    for text, label in _read(train, text_column, label_column):
        truth.setdefault(normalise_for_matching(text), label)
    return truth


def _pseudo_labels_right(name: str, run: Path) -> float | None:
    """The share of the published round's pseudo labels that match the labels the benchmark withheld."""
    path = run / "pseudo_labels.csv"
    if not path.is_file():
        return None
    from tuneforge.data import normalise_for_matching

    truth = withheld_labels(name)
    rows = _read(path, "text", "label")
    right = sum(truth.get(normalise_for_matching(text)) == label for text, label in rows)
    return round(100 * right / max(1, len(rows)), 2)


def _rounds(run: Path) -> Any:
    path = run / "self_training.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    return {
        "published_round": info.get("published_round"),
        "rounds": [
            {key: item.get(key) for key in ("index", "pseudo_labelled", "left_out_by_agreement", "validation", "test")}
            for item in info.get("rounds", [])
        ],
    }


def report(name: str, args: argparse.Namespace, seeds: list[int]) -> None:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for line in RESULTS.read_text(encoding="utf-8").splitlines() if RESULTS.is_file() else []:
        record = json.loads(line)
        if record["dataset"] == name and record["per_label"] == args.per_label and record["budget"] == args.budget:
            latest[(record["condition"], str(record["seed"]))] = record
    plain = {seed: latest[("plain", str(seed))]["test"]["accuracy"] for seed in seeds if ("plain", str(seed)) in latest}
    print(f"{name}, {args.per_label} labelled per label, budget {args.budget}; full-data reference {args.full}")
    named = list(dict.fromkeys(condition for condition, _ in latest))
    for condition in named:
        scores = {seed: latest[(condition, str(seed))] for seed in seeds if (condition, str(seed)) in latest}
        if not scores:
            continue
        accuracy = [r["test"]["accuracy"] for r in scores.values()]
        f1 = [r["test"]["macro_f1"] for r in scores.values()]
        gains = [scores[s]["test"]["accuracy"] - plain[s] for s in scores if s in plain]
        closed = [
            g / (args.full - plain[s]) * 100 for g, s in zip(gains, [s for s in scores if s in plain], strict=True)
        ]
        spread = f" ± {statistics.stdev(accuracy):.2f}" if len(accuracy) > 1 else ""
        print(
            f"  {condition:27s} seeds {sorted(scores)}: accuracy {statistics.mean(accuracy):.2f}{spread} "
            f"({', '.join(f'{a:.2f}' for a in accuracy)}), macro-F1 {statistics.mean(f1):.2f}"
            + (f", gain {statistics.mean(gains):+.2f}, gap closed {statistics.mean(closed):.0f}%" if gains else "")
            + f", minutes {', '.join(str(r['minutes']) for r in scores.values())}"
        )


def check_pseudo_labels(name: str, args: argparse.Namespace, seeds: list[int]) -> None:
    """How right each selection's pseudo labels would be: a finished run (``--labeller``, e.g. ``plain``, which
    is what round 0 reproduces) scores the unlabelled texts, and each selection is checked against the labels
    the benchmark withheld. No training; prints per label how many texts and how many of them are right."""
    from tuneforge.infer.predictor import Predictor
    from tuneforge.train.self_training import select_proportional, select_pseudo_labels

    train, _, text_column, label_column, _ = _source(name)
    truth: dict[str, str] = {}
    for text, label in _read(train, text_column, label_column):
        truth.setdefault(text, label)
    for seed in seeds:
        folder = WORK / f"{name}-{args.per_label}-seed{seed}"
        texts = [text for (text,) in csv.reader((folder / "unlabelled.csv").open(encoding="utf-8"))][1:]
        labelled = [text for text, _ in _read(folder / "labelled.csv", "text", "label")]
        predictor = Predictor(folder / args.labeller, open_set=False, calibrated=False)
        probabilities = [
            row for start in range(0, len(texts), 256) for row in predictor.predict_proba(texts[start : start + 256])
        ]
        labels = predictor.labels
        right = sum(
            labels[max(range(len(labels)), key=row.__getitem__)] == truth[t]
            for t, row in zip(texts, probabilities, strict=True)
        )
        print(
            f"{folder.name}: {len(texts)} unlabelled texts; {args.labeller}'s argmax right on {right / len(texts):.1%}"
        )
        selections = {
            f"threshold {args.threshold}": select_pseudo_labels(
                texts, probabilities, labels, threshold=args.threshold, exclude=labelled
            )
        }
        for fraction in (0.2, 0.4, 0.6, 1.0):
            selections[f"proportional {fraction}"] = select_proportional(
                texts, probabilities, labels, fraction=fraction, exclude=labelled
            )
        for title, chosen in selections.items():
            correct = [truth[t] == y for t, y in zip(chosen.texts, chosen.labels, strict=True)]
            per_label = {
                label: (len(hits), sum(hits))
                for label in labels
                if (hits := [c for c, y in zip(correct, chosen.labels, strict=True) if y == label])
            }
            shown = per_label if len(labels) <= 5 else {}
            print(
                f"  {title:18s} {len(correct):5d} texts, {sum(correct) / max(1, len(correct)):.1%} right"
                + "".join(f"; {label}: {n}, {k / n:.1%} right" for label, (n, k) in shown.items())
                + ("" if shown else f"; {len(per_label)} of {len(labels)} labels get texts")
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["banking77", "waimai"], default="banking77")
    parser.add_argument("--per-label", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--budget", type=int, default=20_000, help="train.min_train_samples for every run")
    parser.add_argument("--rounds", type=int, default=1, help="self-training rounds")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="self-training confidence threshold")
    parser.add_argument("--selection", choices=["threshold", "proportional"], default="threshold")
    parser.add_argument("--fraction", type=float, default=0.4, help="proportional: share labelled in round 1")
    parser.add_argument("--full", type=float, default=93.1, help="full-data test accuracy, for the gap closed")
    parser.add_argument("--phase", choices=["train", "report", "check-pseudo"], default="train")
    parser.add_argument("--labeller", default="plain", help="check-pseudo: the finished run that scores the pool")
    parser.add_argument("--teacher", default=None, help="the seed's finished run that labels round 1, e.g. both")
    parser.add_argument("--agreement", choices=["none", "neighbour", "centroid"], default="none")
    parser.add_argument("--keep", choices=["best", "last"], default="best", help="train.keep of every run")
    parser.add_argument("--cjk-units", choices=["characters", "words"], default="characters", help="augmenting CJK")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.phase == "report":
        report(args.dataset, args, seeds)
        return
    if args.phase == "check-pseudo":
        check_pseudo_labels(args.dataset, args, seeds)
        return
    if not DATA_DIR.is_dir():
        raise SystemExit(f"{DATA_DIR}: not found; set TUNEFORGE_DATA_DIR")
    for seed in seeds:
        folder = write_setting(args.dataset, args.per_label, seed)
        if args.teacher and not (folder / args.teacher / "metrics.json").is_file():
            raise SystemExit(f"{folder / args.teacher}: no finished run to label round 1; train it first")
        for condition in args.conditions.split(","):
            train_condition(args.dataset, folder, condition, args)
    report(args.dataset, args, seeds)


if __name__ == "__main__":
    main()
