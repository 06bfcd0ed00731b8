"""Data-parallel training benchmark: 2 processes x 1 thread against 1 process x 2 threads, same cores.

The same config (a seeded Banking77 subsample, MiniLM-L6 by default) is trained twice with ``tuneforge``
itself: ``1x2`` (``tuneforge train``, ``train.threads=2``) and ``2x1`` (``tuneforge train --nproc 2``,
``train.threads=1``: torchrun, gloo, DistributedDataParallel). The global batch, the seed and the batches
are the same, so both should reach about the same accuracy (dropout masks differ); what differs is the
speed. Reported per condition: training samples/s (rank 0's clock, which includes waiting for the other
process), wall seconds of the whole command, test accuracy; and for ``2x1`` the all-reduce time share,
estimated as (the time of one all-reduce of every trainable gradient, measured alone on 2 gloo
processes, x the steps) / the training time: an upper bound, since DDP overlaps the exchange with the
backward pass. Results are appended to ``benchmarks/results/distributed.jsonl``.

    python benchmarks/bench_distributed.py --dataset banking77 --subsample 2000 --epochs 1 --seed 0
    python benchmarks/bench_distributed.py --smoke   # a tiny random BERT on invented texts: the plumbing only

Not run on real data in this repository yet: the 2-core machine was busy with another benchmark.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench_data import RESULTS_DIR, append_result, dataset, tiny_bert

RESULTS = RESULTS_DIR / "distributed.jsonl"
WORK = RESULTS_DIR / "distributed"
CONDITIONS = {"1x2": (1, 2), "2x1": (2, 1)}  # processes x threads each


def _subsample(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A seeded subsample of the training file (and the full test file), as a raw config."""
    data = dataset(args.dataset)
    with data.train.open(encoding="utf-8", newline="") as handle:
        rows = [(row[data.text_column], row[data.label_column]) for row in csv.DictReader(handle)]
    rows = random.Random(args.seed).sample(rows, min(args.subsample, len(rows)))
    train = folder / "train.csv"
    with train.open("w", encoding="utf-8", newline="") as handle:
        # the dataset's own column names: the config's test file is the real one, read with them
        csv.writer(handle).writerows([(data.text_column, data.label_column), *rows])
    raw = data.config(folder / "run", model={"name": args.model, "max_length": 64})
    raw["data"]["train"] = str(train)
    return raw


def _smoke(folder: Path) -> dict[str, Any]:
    """A 2-layer random BERT and 3 invented intents: seconds per run, figures that mean nothing."""
    words = {"refund": ["refund", "money", "back"], "card": ["card", "lost", "stolen"], "login": ["password", "login"]}
    filler = ["my", "the", "please", "help", "i", "need", "a", "with", "is", "not", "working"]
    model_dir = tiny_bert(folder, [w for ws in words.values() for w in ws] + filler)
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 240), ("test", 60)):
        rows = []
        for i in range(n):
            label = list(words)[i % 3]
            text = rng.sample(filler, rng.randint(2, 6)) + rng.sample(words[label], 1)
            rng.shuffle(text)
            rows.append((" ".join(text), label))
        files[split] = folder / f"{split}.csv"
        with files[split].open("w", encoding="utf-8", newline="") as handle:
            csv.writer(handle).writerows([("text", "label"), *rows])
    return {
        "model": {"name": str(model_dir), "max_length": 32},
        "data": {"train": str(files["train"]), "test": str(files["test"])},
        "train": {"learning_rate": 5e-3, "batch_size": 16},
        "finetune": {"freeze_embeddings": False},
        "output": {"dir": str(folder / "run")},
    }


def _train(raw: dict[str, Any], folder: Path, name: str, processes: int, threads: int) -> dict[str, Any]:
    raw = json.loads(json.dumps(raw))
    raw["output"]["dir"] = str(folder / name)
    raw["train"]["threads"] = threads
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "tuneforge", "train", str(config), "--no-progress", "--overwrite"]
    if processes > 1:
        command += ["--nproc", str(processes)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    metrics = json.loads((folder / name / "metrics.json").read_text())
    return {
        "processes": processes,
        "threads_each": threads,
        "samples_per_second": metrics["train"]["samples_per_second"],
        "train_seconds": metrics["train"]["train_seconds"],
        "steps": metrics["train"]["steps"],
        "wall_seconds": round(wall, 1),
        "test_accuracy": metrics["test"]["accuracy"],
    }


def _trainable_parameters(raw: dict[str, Any]) -> int:
    from tuneforge.config import validate_config
    from tuneforge.train.setup import trainable_model

    config = validate_config(raw)
    model, _ = trainable_model(config, ["a", "b"], total_steps=1)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _allreduce_seconds(numel: int, repeats: int) -> float:
    """Median seconds of one all-reduce of ``numel`` float32 values on 2 gloo processes (this script, under
    torchrun, in ``--probe`` mode)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    command += ["--probe", str(numel), "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"all-reduce probe failed:\n{result.stderr[-3000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


def _probe(numel: int, repeats: int) -> None:
    import statistics

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    buffer = torch.ones(numel)
    dist.all_reduce(buffer)  # warm-up: connections, allocation
    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        print(json.dumps({"seconds": statistics.median(times)}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="banking77", choices=["banking77", "sst2"])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--subsample", type=int, default=2000, help="training texts (seeded sample)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch, the same in both conditions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="all-reduce probe repetitions")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on invented texts (plumbing)")
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        _probe(args.probe, args.repeats)
        return

    name = "smoke" if args.smoke else f"{args.dataset}-{args.model}-n{args.subsample}-seed{args.seed}"
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    raw = _smoke(folder) if args.smoke else _subsample(folder, args)
    raw.setdefault("train", {}).update(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    results = {label: _train(raw, folder, label, *shape) for label, shape in CONDITIONS.items()}
    numel = _trainable_parameters(raw)
    allreduce = _allreduce_seconds(numel, args.repeats)
    two = results["2x1"]
    record = {
        "benchmark": "distributed",
        "setting": name,
        "conditions": results,
        "speedup_2x1_over_1x2": round(two["samples_per_second"] / results["1x2"]["samples_per_second"], 3),
        "accuracy_difference": round(two["test_accuracy"] - results["1x2"]["test_accuracy"], 3),
        "trainable_parameters": numel,
        "allreduce_seconds": round(allreduce, 4),
        "allreduce_share_upper_bound": round(min(1.0, allreduce * two["steps"] / max(two["train_seconds"], 1e-9)), 3),
    }
    if not args.smoke:
        append_result(RESULTS, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
