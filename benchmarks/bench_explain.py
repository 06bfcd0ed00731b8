"""Explanations (issue 17): how faithful they are, how long one takes, and what they cost the server.

Three parts (``--part``, default all), on the evaluation file of ``--dataset`` (Banking77 test or SST-2 dev):

* ``faithfulness``: a seeded sample of ``--texts`` evaluation texts. Each model given (``--run``, the
  PyTorch run, and ``--variant``, e.g. its int8 ONNX variant) is explained by occlusion, and the PyTorch
  run also by integrated gradients, always for the label the model predicts on the whole text. ERASER's
  metrics (DeYoung et al. 2020), with the top ``--top`` (20%) of words by score (signed: the words that
  pushed towards the label; at least one word) as the rationale r:
  comprehensiveness p(y | x) - p(y | x without r) (higher: the words mattered), sufficiency
  p(y | x) - p(y | r alone) (lower: the words were enough). The same for as many words chosen at random
  (seeded, averaged over ``--random-draws`` draws), on the same model; the headline is the ratio of the
  method's comprehensiveness to random's (target ≥ 2). Also AOPC, the mean of each over the bins
  {1, 5, 10, 20, 50}% of the words. Words are cut and removed exactly as the explainers see them
  (``tuneforge.explain.words``: removing a word leaves the spaces around it). All erased texts of a
  model go through one batched ``predict_proba`` call (duplicates once).
* ``latency``: p50/p95 of one explanation (``tuneforge.explain.explain``: what ``tuneforge explain`` runs)
  of each of ``--latency-texts`` sampled texts, after a warm-up: occlusion with each model given,
  integrated gradients with the PyTorch run; ``--threads`` (2) threads. Target: occlusion p50 ≤ 150 ms
  with the int8 variant on 2 cores.
* ``serve``: ``tuneforge serve`` on the variant (else the run) in its own process (``--serve-workers``,
  ``--serve-threads``); /v1/classify latency with K closed-loop classify clients alone
  (``--classify-clients``, one text per request, ``--seconds`` each), then the same while
  ``--explain-clients`` (8) more clients hammer /v1/explain. Reported: classify p50/p99 both ways beside
  the classify target (p99 ≤ 250 ms at 32 clients, BENCHMARKS.md "Inference and serving"), explain
  answers/s and latency, and the deliberate 503s (explain lane full).

    python benchmarks/bench_explain.py --dataset banking77 --run RUN --variant RUN-optimized/variants/onnx-int8
    python benchmarks/bench_explain.py --dataset sst2 --run RUN --variant VARIANT --part faithfulness
    python benchmarks/bench_explain.py --smoke     # ~20 s: a tiny random BERT, checks the script, not the figures

Datasets come from ``$TUNEFORGE_DATA_DIR`` (default ``../shared/data``). Records are appended as JSON lines
to ``benchmarks/results/explain.jsonl`` (``--smoke``: to its temporary folder unless ``--out``); the tables
are printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench_data import RESULTS_DIR, Dataset, append_result, dataset, tiny_bert
from bench_serve import LOOPBACK, LoadResult, ServerProcess, free_port, generate_load

RESULTS = RESULTS_DIR / "explain.jsonl"
BINS = (0.01, 0.05, 0.10, 0.20, 0.50)  # ERASER's AOPC bins
COMPREHENSIVENESS_RATIO_TARGET = 2.0
OCCLUSION_P50_TARGET_MS = 150.0
# BENCHMARKS.md, "Inference and serving": p99 ≤ 250 ms at 32 clients (bench_serve.py checks the same).
CLASSIFY_P99_TARGET_MS = 250.0


# --- data ----------------------------------------------------------------------------------------------------


def evaluation_texts(data: Dataset) -> tuple[list[str], list[str]]:
    from tuneforge.data import read_labelled_file

    found = read_labelled_file(data.evaluation, text_column=data.text_column, label_column=data.label_column)
    return list(found.texts), list(found.labels)


def sample_texts(texts: list[str], labels: list[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded sample of the texts an explainer accepts (1 to MAX_WORDS words), in the file's order."""
    from tuneforge.errors import DataError
    from tuneforge.explain.core import words_to_explain

    usable = []
    for index, text in enumerate(texts):
        try:
            words_to_explain(text)
        except DataError:
            continue
        usable.append(index)
    chosen = sorted(random.Random(seed).sample(usable, min(count, len(usable))))
    return [texts[i] for i in chosen], [labels[i] for i in chosen]


# --- models --------------------------------------------------------------------------------------------------


@dataclass
class Model:
    name: str  # the variant's name (onnx-int8, ...) or the form (model, onnx, ...)
    path: Path
    predictor: Any
    gradients: bool  # a float PyTorch model: integrated gradients can run on it


def load_model(path: Path, threads: int, batch_size: int) -> Model:
    from tuneforge.errors import ModelError
    from tuneforge.explain.integrated import torch_model_of
    from tuneforge.infer.predictor import Predictor

    # No open-set detector: explanations are of the trained labels, and so are the probabilities here.
    predictor = Predictor(path, threads=threads, batch_size=batch_size, open_set=False)
    try:
        torch_model_of(predictor)
        gradients = True
    except ModelError:
        gradients = False
    name = predictor.run.variant().get("name") or ("torch-fp32" if gradients else predictor.form)
    return Model(str(name), path, predictor, gradients)


def load_models(args: argparse.Namespace) -> list[Model]:
    paths = [path for path in (args.variant, args.run) if path is not None]
    if not paths:
        raise SystemExit("give --run RUN_DIR (PyTorch) and/or --variant VARIANT_DIR")
    models = [load_model(path, args.threads, args.batch_size) for path in paths]
    if args.run is not None and not models[-1].gradients:
        print(f"{args.run}: not a float PyTorch model: no integrated gradients", flush=True)
    return models


def probabilities_of(model: Model, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Each distinct text's probabilities, from one batched call."""
    unique = list(dict.fromkeys(texts))
    rows = np.asarray(model.predictor.predict_proba(unique), dtype=np.float64)
    return dict(zip(unique, rows, strict=True))


# --- faithfulness --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One sampled text as a model sees it: its words, the label it predicts, and that label's probability."""

    text: str
    words: list[Any]
    label: int
    probability: float


def erase(text: str, words: Sequence[Any], drop: set[int]) -> str:
    """``text`` without the words ``drop`` (indices), cut as ``without_word`` cuts one: the spaces stay."""
    pieces, at = [], 0
    for index in sorted(drop):
        pieces.append(text[at : words[index].start])
        at = words[index].end
    pieces.append(text[at:])
    return "".join(pieces)


def top_count(fraction: float, words: int) -> int:
    """How many words a rationale of ``fraction`` of ``words`` has: rounded half up, at least one."""
    return max(1, min(words, math.floor(fraction * words + 0.5)))


def cases_for(model: Model, texts: list[str]) -> list[Case]:
    from tuneforge.explain.core import words_to_explain

    found = probabilities_of(model, texts)
    cases = []
    for text in texts:
        row = found[text]
        label = int(np.argmax(row))
        cases.append(Case(text, words_to_explain(text), label, float(row[label])))
    return cases


def occlusion_rankings(model: Model, cases: list[Case], chunk: int = 32) -> list[list[float]]:
    """Occlusion scores of each case for its predicted label: ``chunk`` texts' n + 1 variants per model call."""
    from tuneforge.explain.core import explain_occlusion
    from tuneforge.explain.occlusion import occlusion_texts

    scores: list[list[float]] = []
    for start in range(0, len(cases), chunk):
        part = cases[start : start + chunk]
        batches = [occlusion_texts(case.text, case.words) for case in part]
        rows = np.asarray(model.predictor.predict_proba([t for batch in batches for t in batch]), dtype=np.float64)
        at = 0
        for case, batch in zip(part, batches, strict=True):
            explanation = explain_occlusion(
                model.predictor, case.text, case.words, case.label, rows[at : at + len(batch)]
            )
            scores.append(explanation.scores)
            at += len(batch)
    return scores


def gradient_rankings(model: Model, cases: list[Case], steps: int) -> tuple[list[list[float]], dict[str, Any]]:
    """Integrated gradients of each case for its predicted label (one text at a time: captum batches the path)."""
    from tuneforge.explain import explain

    scores: list[list[float]] = []
    deltas: list[float] = []
    for case in cases:
        found = explain(
            model.predictor,
            case.text,
            method="integrated_gradients",
            label=model.predictor.labels[case.label],
            steps=steps,
        )
        scores.append(found.scores)
        deltas.append(abs(found.delta or 0.0))
    return scores, {"ig_steps": steps, "ig_mean_abs_delta": round(float(np.mean(deltas)), 5)}


def ranked(scores: list[float]) -> list[int]:
    """Word indices from the most positive score (pushed hardest towards the label) down; ties in text order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def erasure_scores(model: Model, cases: list[Case], orders: list[list[list[int]]]) -> dict[str, float]:
    """Mean comprehensiveness and sufficiency at the ``--top`` bin and over all bins (AOPC).

    ``orders[c]``: one or more word orders for case ``c`` (several: random draws, averaged per case).
    """
    wanted: list[str] = []
    for case, case_orders in zip(cases, orders, strict=True):
        for order in case_orders:
            for fraction in BINS:
                top = set(order[: top_count(fraction, len(case.words))])
                rest = set(range(len(case.words))) - top
                wanted += [erase(case.text, case.words, top), erase(case.text, case.words, rest)]
    found = probabilities_of(model, wanted)
    per_bin: dict[float, tuple[list[float], list[float]]] = {fraction: ([], []) for fraction in BINS}
    for case, case_orders in zip(cases, orders, strict=True):
        for fraction in BINS:
            comp, suff = [], []
            for order in case_orders:
                top = set(order[: top_count(fraction, len(case.words))])
                rest = set(range(len(case.words))) - top
                comp.append(case.probability - found[erase(case.text, case.words, top)][case.label])
                suff.append(case.probability - found[erase(case.text, case.words, rest)][case.label])
            per_bin[fraction][0].append(float(np.mean(comp)))
            per_bin[fraction][1].append(float(np.mean(suff)))
    return {
        "comprehensiveness": float(np.mean(per_bin[0.20][0])),
        "sufficiency": float(np.mean(per_bin[0.20][1])),
        "aopc_comprehensiveness": float(np.mean([np.mean(per_bin[f][0]) for f in BINS])),
        "aopc_sufficiency": float(np.mean([np.mean(per_bin[f][1]) for f in BINS])),
        "erased_texts": len(found),
    }


def run_faithfulness(args: argparse.Namespace, data: Dataset, models: list[Model]) -> list[dict[str, Any]]:
    texts, gold = sample_texts(*evaluation_texts(data), args.texts, args.seed)
    print(f"faithfulness: {len(texts)} {data.name} {data.eval_split} texts (seed {args.seed})", flush=True)
    rows = []
    for model in models:
        cases = cases_for(model, texts)
        accuracy = float(np.mean([model.predictor.labels[c.label] == g for c, g in zip(cases, gold, strict=True)]))
        rng = random.Random(args.seed)  # the same random words for every model
        random_orders = [
            [rng.sample(range(len(case.words)), len(case.words)) for _ in range(args.random_draws)] for case in cases
        ]
        started = time.perf_counter()
        chance = erasure_scores(model, cases, random_orders)
        print(f"  {model.name} random: {time.perf_counter() - started:.1f} s", flush=True)
        for method in ("occlusion", "integrated_gradients") if model.gradients else ("occlusion",):
            started = time.perf_counter()
            if method == "occlusion":
                scores, extra = occlusion_rankings(model, cases), {}
            else:
                scores, extra = gradient_rankings(model, cases, args.ig_steps)
            explain_s = time.perf_counter() - started
            found = erasure_scores(model, cases, [[ranked(s)] for s in scores])
            ratio = found["comprehensiveness"] / chance["comprehensiveness"] if chance["comprehensiveness"] else None
            row = {
                "part": "faithfulness",
                "dataset": data.name,
                "model": model.name,
                "model_dir": str(model.path),
                "method": method,
                "texts": len(cases),
                "mean_words": round(float(np.mean([len(c.words) for c in cases])), 2),
                "sample_accuracy": round(accuracy, 4),
                "top": 0.20,
                "comprehensiveness": round(found["comprehensiveness"], 4),
                "sufficiency": round(found["sufficiency"], 4),
                "random_comprehensiveness": round(chance["comprehensiveness"], 4),
                "random_sufficiency": round(chance["sufficiency"], 4),
                "comprehensiveness_ratio": None if ratio is None else round(ratio, 2),
                "aopc_comprehensiveness": round(found["aopc_comprehensiveness"], 4),
                "aopc_sufficiency": round(found["aopc_sufficiency"], 4),
                "random_aopc_comprehensiveness": round(chance["aopc_comprehensiveness"], 4),
                "random_aopc_sufficiency": round(chance["aopc_sufficiency"], 4),
                "random_draws": args.random_draws,
                "explain_seconds": round(explain_s, 1),
                "seed": args.seed,
                **extra,
            }
            rows.append(row)
            print(
                f"  {model.name} {method}: comprehensiveness {row['comprehensiveness']} vs random "
                f"{row['random_comprehensiveness']} ({row['comprehensiveness_ratio']}x), sufficiency "
                f"{row['sufficiency']} vs {row['random_sufficiency']}; {explain_s:.1f} s to explain",
                flush=True,
            )
    return rows


# --- latency -------------------------------------------------------------------------------------------------


def run_latency(args: argparse.Namespace, data: Dataset, models: list[Model]) -> list[dict[str, Any]]:
    from tuneforge.explain import explain
    from tuneforge.explain.core import words_to_explain

    texts, _ = sample_texts(*evaluation_texts(data), args.latency_texts, args.seed + 1)
    words = [len(words_to_explain(text)) for text in texts]
    print(f"latency: {len(texts)} texts, median {int(np.median(words))} words, {args.threads} threads", flush=True)
    jobs = [(model, "occlusion") for model in models]
    jobs += [(model, "integrated_gradients") for model in models if model.gradients]
    rows = []
    for model, method in jobs:
        steps = args.ig_steps if method == "integrated_gradients" else None
        for text in texts[:3]:  # warm-up: lazy initialisation and first-call costs are not latency
            explain(model.predictor, text, method=method, steps=steps)
        times = []
        for text in texts:
            started = time.perf_counter()
            explain(model.predictor, text, method=method, steps=steps)
            times.append((time.perf_counter() - started) * 1000)
        row = {
            "part": "latency",
            "dataset": data.name,
            "model": model.name,
            "model_dir": str(model.path),
            "method": method,
            "texts": len(texts),
            "median_words": float(np.median(words)),
            "threads": args.threads,
            "p50_ms": round(float(np.percentile(times, 50)), 1),
            "p95_ms": round(float(np.percentile(times, 95)), 1),
            "mean_ms": round(float(np.mean(times)), 1),
            "seed": args.seed,
        }
        if steps:
            row["ig_steps"] = steps
        rows.append(row)
        print(f"  {model.name} {method}: p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms", flush=True)
    return rows


# --- serve ---------------------------------------------------------------------------------------------------


async def classify_with_explain(
    port: int, texts: list[str], classify_clients: int, explain_clients: int, seconds: float
) -> tuple[LoadResult, LoadResult | None]:
    # Closed-loop clients until the time is up (no request cap); explain clients start at other texts.
    classify = generate_load(
        port, texts, clients=classify_clients, max_requests=sys.maxsize, max_seconds=seconds, timeout_s=60
    )
    if not explain_clients:
        return await classify, None
    explaining = generate_load(
        port,
        texts,
        clients=explain_clients,
        max_requests=sys.maxsize,
        max_seconds=seconds,
        timeout_s=60,
        path="/v1/explain",
        first_client=classify_clients,
    )
    found = await asyncio.gather(classify, explaining)
    return found[0], found[1]


def run_serve(args: argparse.Namespace, data: Dataset, model_dir: Path) -> list[dict[str, Any]]:
    texts, _ = sample_texts(*evaluation_texts(data), 2000, args.seed + 2)
    port = free_port()
    command = [sys.executable, "-m", "tuneforge", "serve", str(model_dir), "--host", LOOPBACK, "--port", str(port)]
    command += ["--workers", str(args.serve_workers), "--threads", str(args.serve_threads), "--log-level", "warning"]
    print(f"serve: {model_dir}, {args.serve_workers} worker(s) x {args.serve_threads} thread(s)", flush=True)
    server = ServerProcess("tuneforge", command, port)
    rows = []
    try:
        server.wait_ready()
        asyncio.run(classify_with_explain(port, texts, 4, 2, min(args.seconds, 3.0)))  # warm-up, both routes
        for clients in args.classify_clients:
            for explain_clients in (0, args.explain_clients):
                classify, explaining = asyncio.run(
                    classify_with_explain(port, texts, clients, explain_clients, args.seconds)
                )
                row: dict[str, Any] = {
                    "part": "serve",
                    "dataset": data.name,
                    "model_dir": str(model_dir),
                    "workers": args.serve_workers,
                    "threads": args.serve_threads,
                    "classify_clients": clients,
                    "explain_clients": explain_clients,
                    "classify": classify.summary(),
                    "classify_p99_target_ms": CLASSIFY_P99_TARGET_MS,
                }
                if explaining is not None:
                    row["explain"] = explaining.summary()
                rows.append(row)
                shown = f"classify p50 {row['classify']['p50_ms']} p99 {row['classify']['p99_ms']} ms"
                if explaining is not None:
                    e = row["explain"]
                    shown += (
                        f"; explain {e['rps']}/s, p50 {e['p50_ms']} p99 {e['p99_ms']} ms, 503: {e['deliberate_503']}"
                    )
                print(f"  {clients} classify + {explain_clients} explain clients: {shown}", flush=True)
    finally:
        server.stop()
    return rows


# --- report --------------------------------------------------------------------------------------------------


def _cells(values: Sequence[object]) -> str:
    return "| " + " | ".join("–" if value is None else str(value) for value in values) + " |"


def print_tables(rows: list[dict[str, Any]]) -> list[str]:
    verdicts = []
    faithful = [r for r in rows if r["part"] == "faithfulness"]
    if faithful:
        columns = ["dataset", "model", "method", "texts", "comp.", "random comp.", "ratio", "suff.", "random suff."]
        columns += ["AOPC comp.", "random", "AOPC suff.", "random"]
        print("\n" + _cells(columns) + "\n|" + "---|" * 3 + "---:|" * (len(columns) - 3))
        for r in faithful:
            cells = [r["dataset"], r["model"], r["method"], r["texts"], r["comprehensiveness"]]
            cells += [r["random_comprehensiveness"], r["comprehensiveness_ratio"], r["sufficiency"]]
            cells += [r["random_sufficiency"], r["aopc_comprehensiveness"], r["random_aopc_comprehensiveness"]]
            cells += [r["aopc_sufficiency"], r["random_aopc_sufficiency"]]
            print(_cells(cells))
            ratio = r["comprehensiveness_ratio"]
            verdicts.append(
                _verdict(
                    ratio is not None and ratio >= COMPREHENSIVENESS_RATIO_TARGET,
                    f"{r['dataset']} {r['model']} {r['method']}: comprehensiveness {ratio}x random "
                    f"(target ≥ {COMPREHENSIVENESS_RATIO_TARGET:g}x)",
                )
            )
    latency = [r for r in rows if r["part"] == "latency"]
    if latency:
        columns = ["dataset", "model", "method", "texts", "median words", "threads", "p50 ms", "p95 ms", "mean ms"]
        print("\n" + _cells(columns) + "\n|" + "---|" * 3 + "---:|" * (len(columns) - 3))
        for r in latency:
            cells = [r["dataset"], r["model"], r["method"], r["texts"], r["median_words"], r["threads"]]
            print(_cells([*cells, r["p50_ms"], r["p95_ms"], r["mean_ms"]]))
            if r["method"] == "occlusion" and "int8" in r["model"]:
                verdicts.append(
                    _verdict(
                        r["p50_ms"] <= OCCLUSION_P50_TARGET_MS,
                        f"occlusion with {r['model']}: p50 {r['p50_ms']} ms (target ≤ {OCCLUSION_P50_TARGET_MS:g} ms)",
                    )
                )
    serve = [r for r in rows if r["part"] == "serve"]
    if serve:
        columns = ["classify clients", "explain clients", "classify req/s", "classify p50 ms", "classify p99 ms"]
        columns += ["explain /s", "explain p50 ms", "explain p99 ms", "explain 503", "errors"]
        print("\n" + _cells(columns) + "\n|" + "---:|" * len(columns))
        for r in serve:
            c, e = r["classify"], r.get("explain") or {}
            errors = {**c["errors"], **{f"explain {k}": v for k, v in (e.get("errors") or {}).items()}}
            cells = [r["classify_clients"], r["explain_clients"], c["rps"], c["p50_ms"], c["p99_ms"]]
            cells += [e.get("rps"), e.get("p50_ms"), e.get("p99_ms"), e.get("deliberate_503"), errors or "none"]
            print(_cells(cells))
            if e:
                p99 = c["p99_ms"] if c["p99_ms"] is not None else float("inf")
                alone = next(
                    (
                        x["classify"]["p99_ms"]
                        for x in serve
                        if x["classify_clients"] == r["classify_clients"] and not x["explain_clients"]
                    ),
                    None,
                )
                verdicts.append(
                    _verdict(
                        p99 <= CLASSIFY_P99_TARGET_MS,
                        f"classify p99 at {r['classify_clients']} clients with {r['explain_clients']} explaining: "
                        f"{c['p99_ms']} ms ({alone} ms alone; target ≤ {CLASSIFY_P99_TARGET_MS:g} ms at 32 clients)",
                    )
                )
    if verdicts:
        print("\n" + "\n".join(verdicts))
    return verdicts


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {text}"


# --- smoke ---------------------------------------------------------------------------------------------------


def build_smoke(folder: Path) -> tuple[Dataset, Path, Path]:
    """A 2-layer random BERT trained for seconds on invented intents, and its onnx-int8 variant from
    ``tuneforge optimize`` (in RUN-optimized/variants/onnx-int8, as a real run's)."""
    from rich.console import Console

    from tuneforge.config import validate_config
    from tuneforge.optimize.pipeline import OptimizeOptions, optimize_run
    from tuneforge.train.loop import train

    words = {"refund": ["refund", "money", "back"], "card": ["card", "lost", "stolen"], "login": ["password", "login"]}
    filler = ["my", "the", "please", "help", "i", "need", "a", "with", "is", "not", "working"]
    model_dir = tiny_bert(folder, [w for ws in words.values() for w in ws] + filler, word_pieces=True)
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 150), ("test", 60)):
        rows = []
        for i in range(n):
            label = list(words)[i % 3]
            text = rng.sample(filler, rng.randint(2, 8)) + rng.sample(words[label], 1)
            rng.shuffle(text)
            rows.append((" ".join(text) + ("!" if i % 4 == 0 else ""), label))
        if split == "test":
            rows += [("refund", "refund"), ("my card  is   lost", "card")]  # one word; runs of spaces
        files[split] = folder / f"{split}.csv"
        with files[split].open("w", encoding="utf-8", newline="") as handle:
            csv.writer(handle).writerows([("text", "label"), *rows])
    raw = {
        "model": {"name": str(model_dir), "max_length": 32},
        "data": {"train": str(files["train"]), "test": str(files["test"])},
        "train": {"epochs": 6, "learning_rate": 5e-3, "head_learning_rate": 5e-3, "batch_size": 16, "threads": 1},
        "finetune": {"freeze_embeddings": False},
        "output": {"dir": str(folder / "run")},
    }
    quiet = Console(stderr=True, quiet=True)
    run = train(validate_config(raw), console=quiet, show_progress=False).run_dir
    options = OptimizeOptions(variants=("onnx-int8",), threads=1)
    optimized = optimize_run(run, out_dir=folder / "run-optimized", options=options, console=quiet).out_dir
    data = Dataset("smoke", files["train"], files["test"], "text", "label", "test")
    return data, Path(run), Path(optimized) / "variants" / "onnx-int8"


# --- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["faithfulness", "latency", "serve", "all"], default="all")
    parser.add_argument("--dataset", choices=["banking77", "sst2"], default="banking77")
    parser.add_argument("--run", type=Path, help="the PyTorch run directory (occlusion and integrated gradients)")
    parser.add_argument("--variant", type=Path, help="an optimized variant, e.g. RUN-optimized/variants/onnx-int8")
    parser.add_argument("--texts", type=int, default=200, help="faithfulness: sampled evaluation texts")
    parser.add_argument("--random-draws", type=int, default=5, help="faithfulness: random word choices per text")
    parser.add_argument("--ig-steps", type=int, help="integrated gradients: path steps (default: tuneforge's)")
    parser.add_argument("--latency-texts", type=int, default=50, help="latency: sampled texts, each explained once")
    parser.add_argument("--threads", type=int, default=2, help="model threads in this process")
    parser.add_argument("--batch-size", type=int, default=64, help="Predictor batch size")
    parser.add_argument("--seconds", type=float, default=30.0, help="serve: seconds per measurement")
    parser.add_argument("--classify-clients", default="8,32", help="serve: classify clients, comma-separated levels")
    parser.add_argument("--explain-clients", type=int, default=8, help="serve: explain clients beside them")
    parser.add_argument("--serve-workers", type=int, default=2, help="serve: tuneforge serve --workers")
    parser.add_argument("--serve-threads", type=int, default=1, help="serve: tuneforge serve --threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help=f"JSON lines appended here (default {RESULTS})")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script in ~20 s")
    args = parser.parse_args()
    args.classify_clients = [int(x) for x in args.classify_clients.split(",") if x.strip()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parts = ["faithfulness", "latency", "serve"] if args.part == "all" else [args.part]

    with tempfile.TemporaryDirectory(prefix="bench-explain-") as scratch:
        if args.smoke:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            print("smoke: training a tiny random BERT and its onnx-int8 variant ...", flush=True)
            data, args.run, args.variant = build_smoke(Path(scratch))
            args.texts, args.random_draws, args.latency_texts = 100, 2, 5  # texts: all 62
            args.ig_steps, args.threads, args.seconds = 8, 1, 2.0
            args.classify_clients, args.serve_workers, args.serve_threads = [4], 1, 1
            out = args.out or Path(scratch) / "explain.jsonl"
        else:
            data, out = dataset(args.dataset), args.out or RESULTS
        if args.ig_steps is None:
            from tuneforge.explain.integrated import DEFAULT_STEPS

            args.ig_steps = DEFAULT_STEPS
        common = {"bench": "explain", "smoke": args.smoke}
        rows: list[dict[str, Any]] = []
        models = load_models(args) if {"faithfulness", "latency"} & set(parts) else []
        if "faithfulness" in parts:
            rows += run_faithfulness(args, data, models)
        if "latency" in parts:
            rows += run_latency(args, data, models)
        if "serve" in parts:
            served = args.variant or args.run
            if served is None:
                raise SystemExit("serve: give --variant VARIANT_DIR or --run RUN_DIR")
            rows += run_serve(args, data, served)
        for row in rows:
            append_result(out, {**common, **row})
        print_tables(rows)
        print(f"\n{len(rows)} records appended to {out}")


if __name__ == "__main__":
    main()
