"""What makes self-training's round 1 work? Replays round 1 of a finished low-data run with its pseudo labels.

``bench_low_data.py`` runs self-training end to end; this script takes one of its finished runs (by
default ``both-agree-neighbour``: augmentation + self-training with the agreement filter) and trains round
1 again by hand on the same labelled split and the same pseudo labels (the run's ``pseudo_labels.csv``),
changing one thing at a time, so that a difference is the change and not a different round 0:

- ``--augment all``: ``data.augment`` over the labelled and the pseudo-labelled rows (what the product's
  round 1 does; the five model-free operations, one copy each, at ``--rate``);
- ``--augment labelled``: augmented copies of the labelled rows only, the pseudo-labelled rows as they are;
- ``--augment none``: no augmentation at all;
- ``--epochs N``: a fixed number of epochs instead of the budget (``train.min_train_samples`` 20,000, at
  least 3 epochs); early stopping (patience 3 on validation) still applies;
- ``--oracle``: a diagnostic: the pseudo-labelled texts keep their true labels (the ones the benchmark
  withheld), so the run shows what the same texts would give without a wrong pseudo label among them;
- ``--prepare-only``: write the training files and the config and stop;
- ``--validate-on-test``: a diagnostic, not a result: the test set is the validation split, so the log's
  per-epoch validation accuracy is the test accuracy after each epoch (and the kept checkpoint is chosen
  on test: read the per-epoch figures, not the final one).

Results are appended to ``benchmarks/results/round1_ablation.jsonl`` with the per-epoch validation scores.

    python benchmarks/bench_round1_ablation.py --seed 0 --augment labelled
    python benchmarks/bench_round1_ablation.py --seed 0 --augment none --epochs 18
    python benchmarks/bench_round1_ablation.py --seed 0 --augment all --rate 0.2
    python benchmarks/bench_round1_ablation.py --seed 0 --augment all --rate 0.1 --validate-on-test
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

from bench_data import RESULTS_DIR, append_result, run_tuneforge, write_config
from bench_low_data import withheld_labels

RESULTS = RESULTS_DIR / "round1_ablation.jsonl"
LOW_DATA = RESULTS_DIR / "low_data"
OPERATIONS = ["swap", "delete", "insert", "typo", "case"]


def _write_csv(path: Path, rows: Any) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def _run_name(args: argparse.Namespace) -> str:
    name = f"round1-{args.augment}"
    if args.augment != "none":
        name += f"-r{args.rate}"
    if args.epochs:
        name += f"-e{args.epochs}"
    if args.oracle:
        name += "-oracle"
    return name + ("-valtest" if args.validate_on_test else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="banking77")
    parser.add_argument("--per-label", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default="both-agree-neighbour", help="the finished self-training run replayed")
    parser.add_argument("--augment", choices=["all", "labelled", "none"], default="all")
    parser.add_argument("--rate", type=float, default=0.1, help="data.augment.rate")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--validate-on-test", action="store_true")
    parser.add_argument("--oracle", action="store_true", help="the pseudo-labelled texts with their true labels")
    parser.add_argument("--prepare-only", action="store_true", help="write the run's files and config, train nothing")
    args = parser.parse_args()

    import yaml

    from tuneforge.augment.pipeline import augment_texts
    from tuneforge.config import RunConfig
    from tuneforge.data.prepare import prepare_data
    from tuneforge.train.extra_texts import augment_options

    folder = LOW_DATA / f"{args.dataset}-{args.per_label}-seed{args.seed}"
    source = folder / args.source
    if not (source / "pseudo_labels.csv").is_file():
        raise SystemExit(f"{source}: no finished self-training run with pseudo_labels.csv; run bench_low_data.py")
    config = RunConfig.model_validate(yaml.safe_load((source / "config.yaml").read_text(encoding="utf-8")))
    data = prepare_data(config.data, seed=config.train.seed)  # the same labelled/validation split as the run
    with (source / "pseudo_labels.csv").open(encoding="utf-8", newline="") as handle:
        pseudo = [(row["text"], row["label"]) for row in csv.DictReader(handle)]
    if args.oracle:
        from tuneforge.data import normalise_for_matching

        truth = withheld_labels(args.dataset)
        pseudo = [(text, truth[normalise_for_matching(text)]) for text, _ in pseudo]
    labelled = list(zip(data.train.texts, data.train.labels, strict=True))
    if args.augment == "labelled":
        options = augment_options(config.data.augment.model_copy(update={"rate": args.rate}), config)
        copies = augment_texts(data.train.texts, data.train.labels, options)
        labelled = list(zip(copies.texts, copies.labels, strict=True))

    name = _run_name(args)
    out = folder / name
    files = folder / f"{name}-files"
    files.mkdir(exist_ok=True)
    _write_csv(files / "train.csv", [*labelled, *pseudo])
    validation = data.test if args.validate_on_test else data.validation
    _write_csv(files / "validation.csv", zip(validation.texts, validation.labels, strict=True))
    _write_csv(files / "test.csv", zip(data.test.texts, data.test.labels, strict=True))
    raw: dict[str, Any] = {
        "model": {"name": config.model.name},
        "data": {k: str(files / f"{k}.csv") for k in ("train", "validation", "test")},
        "train": {"min_train_samples": config.train.min_train_samples, "seed": config.train.seed},
        "output": {"dir": str(out)},
    }
    if args.augment == "all":
        raw["data"]["augment"] = {"operations": OPERATIONS, "copies": 1, "rate": args.rate}
    if args.epochs:
        raw["train"]["epochs"] = args.epochs
    config_file = write_config(raw, files / "config.yaml")
    if args.prepare_only:
        print(f"{config_file}: {len(labelled)} labelled and {len(pseudo)} pseudo-labelled rows")
        return
    started = time.perf_counter()
    run_tuneforge("train", str(config_file), "--overwrite", "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    with (out / "train_log.jsonl").open(encoding="utf-8") as handle:
        evals = [entry for entry in map(json.loads, handle) if "eval" in entry]
    record = append_result(
        RESULTS,
        {
            "dataset": args.dataset,
            "seed": args.seed,
            "source": args.source,
            "run": name,
            "augment": args.augment,
            "rate": args.rate if args.augment != "none" else None,
            "epochs": args.epochs,
            "labelled_rows": len(labelled),
            "pseudo_rows": len(pseudo),
            "validate_on_test": args.validate_on_test,
            "oracle": args.oracle,
            "per_epoch_validation": [round(e["value"], 2) for e in evals],
            "test_accuracy": round(metrics["test"]["accuracy"], 2),
            "test_macro_f1": round(metrics["test"]["macro_f1"], 2),
            "minutes": round((time.perf_counter() - started) / 60, 1),
        },
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
