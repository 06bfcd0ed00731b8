"""Calibration benchmark (issue 17): ECE, Brier score and NLL on held-out data before and after the
temperature each run or variant fitted on its own validation data, and the accuracy (unchanged: a
temperature never changes the arg-max).

For every path given (a run directory, or a variant ``optimize`` made: ``RUN-optimized``, or one of
``RUN-optimized/variants/``): the raw logits of the evaluation file (Banking77 test / SST-2 dev) from
the same loader the server uses, then the raw softmax against the softmax at the path's stored
temperature (``calibration.json``; the temperature is never fitted on the evaluation file here). A
reliability diagram per path is written next to the records. Records are appended to
``benchmarks/results/calibration.jsonl``.

    python benchmarks/bench_calibration.py --dataset banking77 runs/banking77 runs/banking77-int8
    python benchmarks/bench_calibration.py --dataset sst2 runs/sst2 --texts 200   # a seeded sample only

Also reported: the ECE of a temperature cross-fitted on the evaluation file's two seeded halves (see
``cross_fitted``), for data whose validation split is not of the evaluation file's kind.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from bench_data import RESULTS_DIR, append_result, dataset
from tuneforge.data import read_eval_file
from tuneforge.infer.calibration import (
    before_after,
    calibration_metrics,
    fit_temperature,
    plot_reliability,
    scaled_probabilities,
)
from tuneforge.infer.evaluate import eval_data_config
from tuneforge.infer.predictor import Predictor

RESULTS = RESULTS_DIR / "calibration.jsonl"
TARGETS = {"banking77": 0.02, "sst2": 0.03}  # ECE after scaling, issue 17's "done when"


def measure(path: Path, name: str, texts_limit: int | None, seed: int) -> dict:
    data = dataset(name)
    predictor = Predictor(path)
    config = eval_data_config(predictor, data.evaluation, data.text_column, data.label_column, None)
    rows = read_eval_file(data.evaluation, config, predictor.labels)
    pairs = list(zip(rows.texts, rows.labels, strict=True))
    if texts_limit and texts_limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, texts_limit)
    texts = [text for text, _ in pairs]
    index = {label: i for i, label in enumerate(predictor.labels)}
    truth = np.asarray([index[label] for _, label in pairs])
    started = time.perf_counter()
    logits = np.asarray(predictor.logits(texts))
    seconds = time.perf_counter() - started
    temperature = predictor.temperature
    figures = before_after(logits, truth, temperature)
    halves = cross_fitted(logits, truth, seed)
    diagram = RESULTS_DIR / "calibration" / f"{name}-{path.name}.png"
    diagram.parent.mkdir(parents=True, exist_ok=True)
    plot_reliability(logits, truth, temperature, diagram, f"{path.name} on {name} {data.evaluation.stem}")
    return {
        "bench": "calibration",
        "dataset": name,
        "path": str(path),
        "texts": len(texts),
        "temperature": temperature,
        "before": figures["before"],
        "after": figures["after"],
        "cross_fitted": halves,
        "ece_target": TARGETS[name],
        "scoring_seconds": round(seconds, 1),
        "diagram": str(diagram),
    }


def cross_fitted(logits: np.ndarray, truth: np.ndarray, seed: int) -> dict:
    """Two-fold cross-fitting on the evaluation file itself: a temperature fitted on one seeded half scores
    the other half, and the other way round (the two halves' probabilities pooled). For data whose only
    labelled texts of the deployed kind are the evaluation file (SST-2: training phrases, dev sentences),
    this says what a temperature fitted on a few hundred texts of that kind gives, never scoring a text
    with a temperature that saw it."""
    order = np.random.default_rng(seed).permutation(len(truth))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    probabilities = np.zeros_like(logits, dtype=np.float64)
    temperatures = []
    for fit_on, score_on in (halves, halves[::-1]):
        temperature = fit_temperature(logits[fit_on], truth[fit_on])
        temperatures.append(round(temperature, 4))
        probabilities[score_on] = scaled_probabilities(logits[score_on], temperature)
    return {"temperatures": temperatures, **calibration_metrics(probabilities, truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or optimized variants")
    parser.add_argument("--dataset", required=True, choices=sorted(TARGETS))
    parser.add_argument("--texts", type=int, help="a seeded sample of the evaluation file (default: all of it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"{'path':<52} {'T':>6} {'ECE before':>10} {'after':>7} {'Brier b/a':>15} {'NLL b/a':>15} {'acc':>6}"
        "  (cross-fitted on the evaluation file: ECE, T of each half)"
    )
    for path in args.paths:
        record = measure(path, args.dataset, args.texts, args.seed)
        append_result(RESULTS, record)
        before, after = record["before"], record["after"]
        ok = "ok" if after["ece"] <= record["ece_target"] else f"> {record['ece_target']}"
        print(
            f"{path!s:<52} {record['temperature']:>6.3f} {before['ece']:>10.4f} {after['ece']:>7.4f} "
            f"{before['brier']:>7.4f}/{after['brier']:<7.4f} {before['nll']:>7.4f}/{after['nll']:<7.4f} "
            f"{after['accuracy']:>6.2f}  {ok}  ({record['cross_fitted']['ece']:.4f}, "
            f"{record['cross_fitted']['temperatures']})"
        )


if __name__ == "__main__":
    main()
