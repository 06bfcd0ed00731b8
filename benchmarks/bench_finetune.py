"""Fine-tuning benchmark: tuneforge against the Hugging Face Trainer on SST-2 and Banking77.

Two parts, both run from this one script on the same machine:

* ``accuracy``: tuneforge with the default model and the default config on the full training set;
  SST-2 is scored on its dev set, Banking77 on its test set.
* ``speed``: a fixed, seeded 10,000-example subsample for one epoch, trained by tuneforge and by the
  HF ``Trainer`` (DataCollatorWithPadding, its usual set-up) with equal settings (model, batch size,
  learning rate, schedule, warm-up, weight decay, clipping, epochs, max length, threads). Prints
  train samples/s for both and the ratio, and both accuracies scored by the same code.

    python benchmarks/bench_finetune.py --dataset banking77 --part accuracy
    python benchmarks/bench_finetune.py --dataset all --part speed

The datasets are read from ``$TUNEFORGE_DATA_DIR`` (default ``../shared/data``). Results are
appended as JSON lines to ``benchmarks/results/finetune.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench_data import DATASETS, RESULTS_DIR, append_result, dataset
from tuneforge.config import apply_overrides, validate_config
from tuneforge.data import LabelledTexts, clean_texts, read_labelled_file, stratified_subsample
from tuneforge.data.batching import encode_texts
from tuneforge.metrics import classification_metrics
from tuneforge.models.loading import predict_logits
from tuneforge.pretrained import resolve_model
from tuneforge.train.loop import train

RESULTS = RESULTS_DIR / "finetune.jsonl"
SPEED_SUBSAMPLE = 10_000
SPEED_SETTINGS = {
    "batch_size": 32,
    "learning_rate": 1e-4,
    "epochs": 1,
    "max_length": 128,
    "warmup_ratio": 0.06,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "seed": 42,
}


def _files(name: str) -> tuple[Path, Path, str, str, str]:
    data = dataset(name)
    return data.train, data.evaluation, data.text_column, data.label_column, data.eval_split


def _record(result: dict) -> None:
    print(json.dumps(append_result(RESULTS, {**result, "threads": torch.get_num_threads()}), indent=2))


def run_accuracy(name: str, overrides: dict) -> None:
    """tuneforge with the default model and default config on the full training set."""
    split = dataset(name).eval_split
    with tempfile.TemporaryDirectory() as tmp:
        raw = dataset(name).config(Path(tmp) / "run")
        apply_overrides(raw, [f"{key}={value}" for key, value in overrides.items()])
        config = validate_config(raw)
        started = time.perf_counter()
        result = train(config, show_progress=False)
        wall = time.perf_counter() - started
    _record(
        {
            "benchmark": "accuracy",
            "dataset": name,
            "eval_split": split,
            "overrides": overrides,
            "accuracy": result.metrics["test"]["accuracy"],
            "macro_f1": result.metrics["test"]["macro_f1"],
            "validation_accuracy": result.metrics["validation"]["accuracy"],
            "train": result.metrics["train"],
            "wall_minutes": round(wall / 60, 2),
            "config": config.model_dump(mode="json"),
        }
    )


def _hf_trainer(train_data: LabelledTexts, labels: list[str], out: Path) -> tuple[torch.nn.Module, dict, float]:
    """The Trainer as its documentation sets it up: tokenise a Dataset, DataCollatorWithPadding."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    source = resolve_model("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(source)
    index = {label: i for i, label in enumerate(labels)}
    encoded = tokenizer(train_data.texts, truncation=True, max_length=SPEED_SETTINGS["max_length"])
    # A list of feature dicts is a map-style dataset to the Trainer; the collator pads each batch.
    dataset = [
        {**{key: encoded[key][i] for key in encoded}, "labels": index[y]} for i, y in enumerate(train_data.labels)
    ]
    torch.manual_seed(SPEED_SETTINGS["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=SPEED_SETTINGS["batch_size"],
        learning_rate=SPEED_SETTINGS["learning_rate"],
        num_train_epochs=SPEED_SETTINGS["epochs"],
        lr_scheduler_type="linear",
        warmup_steps=SPEED_SETTINGS["warmup_ratio"],
        weight_decay=SPEED_SETTINGS["weight_decay"],
        max_grad_norm=SPEED_SETTINGS["max_grad_norm"],
        seed=SPEED_SETTINGS["seed"],
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=50,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    return model, output.metrics, wall


def _score(model: torch.nn.Module, tokenizer_source: str, data: LabelledTexts, labels: list[str]) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    ids = encode_texts(tokenizer, data.texts, SPEED_SETTINGS["max_length"])
    predictions = predict_logits(model, ids, pad_id=tokenizer.pad_token_id or 0).argmax(-1).tolist()
    index = {label: i for i, label in enumerate(labels)}
    return classification_metrics([index[y] for y in data.labels], predictions, labels)["accuracy"]


def run_speed(name: str, n_subsample: int = SPEED_SUBSAMPLE) -> None:
    """Equal settings, one epoch on a fixed subsample: tuneforge vs the HF Trainer, in this process."""
    train_path, eval_path, text_col, label_col, split = _files(name)
    read = {"text_column": text_col, "label_column": label_col}
    full, _ = clean_texts(read_labelled_file(train_path, **read))
    subsample = stratified_subsample(full, n=min(n_subsample, len(full)), seed=SPEED_SETTINGS["seed"])
    evaluation, _ = clean_texts(read_labelled_file(eval_path, **read))
    labels = sorted(set(subsample.labels))
    with tempfile.TemporaryDirectory() as tmp:
        sub_file = Path(tmp) / "subsample.jsonl"
        sub_file.write_text(
            "".join(
                json.dumps({text_col: t, label_col: y}) + "\n"
                for t, y in zip(subsample.texts, subsample.labels, strict=True)
            )
        )
        s = SPEED_SETTINGS
        config = validate_config(
            {
                "model": {"max_length": s["max_length"]},
                # The evaluation file as validation: with one epoch and no early stopping it only scores the
                # final model, and both trainers see exactly the same 10,000 training examples.
                "data": {"train": str(sub_file), "validation": str(eval_path), **read},
                # The Trainer updates every weight, so tuneforge must too for equal settings.
                "finetune": {"freeze_embeddings": False},
                "train": {
                    "epochs": s["epochs"],
                    "batch_size": s["batch_size"],
                    "learning_rate": s["learning_rate"],
                    "head_learning_rate": None,
                    "warmup_ratio": s["warmup_ratio"],
                    "schedule": "linear",
                    "weight_decay": s["weight_decay"],
                    "max_grad_norm": s["max_grad_norm"],
                    "seed": s["seed"],
                    "label_smoothing": 0.0,
                    "early_stopping_patience": None,
                    "checkpoint_every_steps": 10**6,
                },
                "output": {"dir": str(Path(tmp) / "tuneforge")},
            }
        )
        started = time.perf_counter()
        ours = train(config, show_progress=False)
        ours_wall = time.perf_counter() - started
        from tuneforge.models.loading import load_classifier

        ours_model, _ = load_classifier(ours.run_dir / "model")
        ours_accuracy = _score(ours_model, str(ours.run_dir / "model"), evaluation, labels)

        hf_model, hf_metrics, hf_wall = _hf_trainer(subsample, labels, Path(tmp) / "hf")
        hf_accuracy = _score(hf_model, resolve_model("minilm-l6"), evaluation, labels)

    ours_sps = ours.metrics["train"]["samples_per_second"]
    hf_sps = hf_metrics["train_samples_per_second"]
    _record(
        {
            "benchmark": "speed",
            "dataset": name,
            "eval_split": split,
            "subsample": len(subsample),
            "settings": SPEED_SETTINGS,
            "tuneforge": {
                "train_samples_per_s": ours_sps,
                "accuracy": ours_accuracy,
                "train_examples": ours.metrics["train"]["examples"],
                "wall_s_incl_eval": round(ours_wall, 1),
            },
            "hf_trainer": {
                "train_samples_per_s": round(hf_sps, 2),
                "accuracy": hf_accuracy,
                "train_examples": len(subsample),
                "train_wall_s": round(hf_wall, 1),
            },
            "speedup": round(ours_sps / hf_sps, 2),
            "accuracy_gap": round(ours_accuracy - hf_accuracy, 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    parser.add_argument("--part", choices=["accuracy", "speed", "all"], default="all")
    parser.add_argument("--subsample", type=int, default=SPEED_SUBSAMPLE, help="training examples, speed part")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a default for the accuracy part (to explore; the record keeps it)",
    )
    args = parser.parse_args()
    # Kept as written (strings) so the record shows them verbatim; apply_overrides parses the values.
    overrides = dict(item.split("=", 1) for item in args.overrides)
    torch.set_num_threads(os.cpu_count() or 1)
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        if args.part in ("accuracy", "all"):
            run_accuracy(name, overrides)
        if args.part in ("speed", "all"):
            run_speed(name, args.subsample)


if __name__ == "__main__":
    main()
