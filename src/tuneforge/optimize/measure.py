"""Measure a model variant the way a user would feel it: accuracy, latency, throughput, size, memory.

All variants are measured in one process on the same texts, one after another, so their ratios hold
even on a noisy shared machine. Peak memory is the process's resident high-water mark, reset before
each variant (Linux ``/proc/self/clear_refs``), so it includes the interpreter and libraries: compare
variants with each other, not with other tools.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.metrics import classification_metrics
from tuneforge.models.runs import Classifier

THROUGHPUT_BATCH = 32


@dataclass
class Measurement:
    name: str
    accuracy: float
    macro_f1: float
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_bs32: float
    size_mb: float
    peak_rss_mb: float | None
    parameters: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def folder_size_mb(path: Path, suffixes: tuple[str, ...] = (".safetensors", ".onnx", ".data")) -> float:
    """Size of the weights on disk (tokenizer and JSON files excluded: they are the same for every variant)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def measure(
    name: str,
    classifier: Classifier,
    encoded: list[list[int]],
    labels: list[int],
    label_names: list[str],
    *,
    pad_id: int,
    size_mb: float,
    latency_samples: int = 200,
    parameters: int | None = None,
    on_logits: Callable[[np.ndarray], None] | None = None,
) -> Measurement:
    """Score ``classifier`` on pre-tokenised validation texts and time it at batch 1 and batch 32.

    ``on_logits`` receives the validation logits the accuracy came from (the variant's calibration is
    fitted on them: no second pass)."""
    # Warm-up: the first calls allocate buffers and pick kernels.
    classifier.logits(encoded[:THROUGHPUT_BATCH], pad_id=pad_id, batch_size=THROUGHPUT_BATCH)
    started = time.perf_counter()
    logits = classifier.logits(encoded, pad_id=pad_id, batch_size=THROUGHPUT_BATCH)
    throughput = len(encoded) / (time.perf_counter() - started)
    metrics = classification_metrics(labels, logits.argmax(axis=-1).tolist(), label_names)
    if on_logits is not None:
        on_logits(logits)

    # Batch-1 latency over an evenly spread sample, so short and long texts are both represented.
    step = max(1, len(encoded) // latency_samples)
    timings = []
    for ids in encoded[::step][:latency_samples]:
        started = time.perf_counter()
        classifier.logits([ids], pad_id=pad_id, batch_size=1)
        timings.append((time.perf_counter() - started) * 1000)
    return Measurement(
        name=name,
        accuracy=metrics["accuracy"],
        macro_f1=metrics["macro_f1"],
        latency_p50_ms=round(float(np.percentile(timings, 50)), 2),
        latency_p95_ms=round(float(np.percentile(timings, 95)), 2),
        throughput_bs32=round(throughput, 1),
        size_mb=size_mb,
        peak_rss_mb=peak_rss_mb(),
        parameters=parameters,
    )


def paired_drop(baseline_right: np.ndarray, variant_right: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """A variant's accuracy drop against the baseline on the same texts, and its upper confidence bound.

    Both arrays say, per validation text, whether that model was right. The two are scored on the same
    texts, so only the texts where they disagree carry information: the standard error of the paired
    difference is ``sqrt(b + c - (b - c)**2 / n) / n`` (b: only the baseline right, c: only the variant
    right). Returns points: (observed drop, drop + z standard errors).
    """
    n = len(baseline_right)
    if n == 0 or len(variant_right) != n:
        raise ValueError("paired_drop: two equally long, non-empty arrays of right/wrong per text")
    b = int(np.sum(baseline_right & ~variant_right))
    c = int(np.sum(~baseline_right & variant_right))
    drop = 100.0 * (b - c) / n
    standard_error = 100.0 * float(np.sqrt(max(b + c - (b - c) ** 2 / n, 0.0))) / n
    return drop, drop + z * standard_error


def pick_variant(
    measurements: list[Measurement], *, baseline: str, max_drop: float, target: str
) -> tuple[Measurement, list[str]]:
    """The best variant whose accuracy is within ``max_drop`` points of the baseline's; and why others lost.

    target "latency": lowest batch-1 p50 latency, ties broken by throughput; "size": smallest on disk,
    ties broken by latency. The baseline itself is always eligible, so there is always an answer.
    """
    if target not in ("latency", "size"):
        raise ValueError(f"target must be latency or size, not {target!r}")
    reference = next((m for m in measurements if m.name == baseline), None)
    if reference is None:
        raise ValueError(f"baseline {baseline!r} was not measured")
    floor = reference.accuracy - max_drop
    eligible = [m for m in measurements if m.accuracy >= floor - 1e-9]
    rejected = [
        f"{m.name}: accuracy {m.accuracy:.2f} is more than {max_drop} below {reference.accuracy:.2f}"
        for m in measurements
        if m not in eligible
    ]
    if target == "latency":
        best = min(eligible, key=lambda m: (m.latency_p50_ms, -m.throughput_bs32))
    else:
        best = min(eligible, key=lambda m: (m.size_mb, m.latency_p50_ms))
    return best, rejected


def markdown_table(measurements: list[Measurement], *, baseline: str, chosen: str | None = None) -> str:
    reference = next(m for m in measurements if m.name == baseline)
    lines = [
        "| variant | accuracy | Δ acc | macro-F1 | p50 ms (bs 1) | p95 ms | samples/s (bs 32) | × throughput "
        "| size MB | × smaller | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in measurements:
        mark = " **(chosen)**" if m.name == chosen else ""
        lines.append(
            f"| {m.name}{mark} | {m.accuracy:.2f} | {m.accuracy - reference.accuracy:+.2f} | {m.macro_f1:.2f} "
            f"| {m.latency_p50_ms:.1f} | {m.latency_p95_ms:.1f} | {m.throughput_bs32:.1f} "
            f"| {m.throughput_bs32 / reference.throughput_bs32:.2f} | {m.size_mb:.1f} "
            f"| {reference.size_mb / max(m.size_mb, 1e-9):.2f} | {m.peak_rss_mb or float('nan'):.0f} |"
        )
    return "\n".join(lines)


def plot_frontier(measurements: list[Measurement], path: Path, *, chosen: str | None, title: str) -> None:
    """Accuracy against batch-1 latency; marker area proportional to size on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneforge.files import atomic_write_with

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        biggest = max(m.size_mb for m in measurements) or 1.0
        for m in measurements:
            ax.scatter(
                m.latency_p50_ms,
                m.accuracy,
                s=40 + 600 * m.size_mb / biggest,
                alpha=0.6,
                edgecolors="tab:red" if m.name == chosen else "black",
                linewidths=2.5 if m.name == chosen else 0.8,
            )
            ax.annotate(
                f"{m.name}\n{m.size_mb:.0f} MB",
                (m.latency_p50_ms, m.accuracy),
                fontsize=8,
                xytext=(6, 4),
                textcoords="offset points",
            )
        ax.set_xlabel("latency p50 at batch 1 (ms, lower is better)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
