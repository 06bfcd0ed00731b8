"""SST-2 with a validation split of dev's kind: whole sentences, held out together with all their phrases.

SST-2's training file is phrase-level (every phrase of ~6.9k treebank sentences, sentences included) while
dev is whole sentences; a random 5% validation split is therefore phrases, and a temperature fitted on
phrases does not fit sentences (BENCHMARKS.md, "Calibration"). This writes, under
``benchmarks/results/sst2-sentences/`` (gitignored: SST-2's text never enters the project):

- ``validation.csv``: ``--sentences`` whole training sentences drawn at random (seeded);
- ``train.csv``: the training file without them and without every phrase that occurs inside one of them
  (so the model never saw a held-out sentence in pieces);
- ``config.yaml``: the default config on those two files (``data.validation`` given), output
  ``runs/sst2-sentences``; the end-of-training temperature is then fitted on whole sentences.

    python benchmarks/sst2_sentence_split.py            # writes the files and prints the counts
    tuneforge train benchmarks/results/sst2-sentences/config.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import random

from bench_data import RESULTS_DIR, dataset
from bench_transfer_distill import whole_sentences
from tuneforge.data import normalise_for_matching

OUT = RESULTS_DIR / "sst2-sentences"


def _normalised(text: str) -> str:
    """Padded with spaces, so that a containment test matches whole words only."""
    return f" {normalise_for_matching(text)} "


def split(sentences: int, seed: int) -> dict[str, int]:
    data = dataset("sst2")
    with data.train.open(encoding="utf-8", newline="") as handle:
        rows = [
            (row["sentence"].strip(), row["label"])
            for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]
    held_out = random.Random(seed).sample(whole_sentences(data.train), sentences)
    joined = "\n".join(_normalised(text) for text, _ in held_out)
    kept = [(text, label) for text, label in rows if _normalised(text) not in joined]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", kept), ("validation.csv", held_out)):
        with (OUT / name).open("w", encoding="utf-8", newline="") as handle:
            csv.writer(handle).writerows([(data.text_column, data.label_column), *part])
    config = data.config("runs/sst2-sentences")
    config["data"].update(train=str(OUT / "train.csv"), validation=str(OUT / "validation.csv"))
    (OUT / "config.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return {"training_rows": len(rows), "held_out_sentences": len(held_out), "training_rows_kept": len(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=800, help="whole sentences held out (dev has 872)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(split(args.sentences, args.seed)))


if __name__ == "__main__":
    main()
