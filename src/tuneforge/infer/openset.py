"""Out-of-scope detection at inference time: the intent engine's files in a run directory, scores, decisions.

``tuneforge intent fit`` (``tuneforge.apps.intent``) fits a detector after training and writes it into the
run as plain files; everything that loads a run (predict, evaluate, serve, the optimized variants) reads
them here, so a run with a detector answers ``in_scope``, ``out_of_scope`` or ``ambiguous``:

    RUN/intent/detector.json        method, thresholds, the labels it was fitted for, validation figures,
                                    the intents added from examples (with their examples)
    RUN/intent/stats.safetensors    class means and the shared precision matrix of the head's input
                                    features (Mahalanobis), the normalised training features (kNN)

Scores are "in-scope-ness": higher means more like the training intents; a text is in scope when its
score reaches the threshold. The methods (Podolskiy et al. 2021 compare them for intents):

* ``msp``: the largest softmax probability (Hendrycks & Gimpel 2017);
* ``energy``: ``logsumexp(logits)``, the negative free energy (Liu et al. 2020);
* ``mahalanobis``: minus the smallest Mahalanobis distance of the features to a class mean, with one
  covariance shared by all classes (Lee et al. 2018);
* ``knn``: cosine similarity of the normalised features to their k-th nearest training text (Sun et al. 2022).

The msp and energy scores read calibrated logits, ``logits / temperature``: the detector keeps the
temperature its thresholds were fitted at (the run's calibration when ``tuneforge intent fit`` ran, see
:mod:`tuneforge.infer.calibration`), so a later recalibration of the run changes the probabilities
shown but not where the threshold cuts. A detector file from before calibration existed has no
temperature and means 1: the raw logits it was fitted on. The probabilities a decision reports are the
run's current calibrated ones.

Intents added from a handful of examples (``tuneforge intent add``) are class means in the same feature
space: a text whose nearest mean is an added intent gets that intent, in scope when its Mahalanobis
score reaches ``feature_threshold`` (fitted like ``threshold``, so adding intents needs no retraining).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.errors import RunDirError
from tuneforge.files import atomic_replace_dir
from tuneforge.rundir import read_versioned_json

INTENT_DIR = "intent"
DETECTOR_FILE = "detector.json"
STATS_FILE = "stats.safetensors"
FORMAT_VERSION = 1
# What a damaged or mismatched detector's message tells the user to do.
_FIT_AGAIN = "fit it again with tuneforge intent fit"
METHODS = ("msp", "energy", "mahalanobis", "knn")
FEATURE_METHODS = ("mahalanobis", "knn")
DECISIONS = ("in_scope", "out_of_scope", "ambiguous")


@dataclass(frozen=True)
class AddedIntent:
    label: str
    examples: list[str]
    # Its own in-scope threshold on the Mahalanobis score: a prototype of ten examples is looser than a
    # trained class mean, so the trained classes' threshold would reject most of its texts. None: theirs.
    threshold: float | None = None


@dataclass
class OpenSetDecision:
    decision: str  # one of DECISIONS
    label: str  # the intent, or the detector's OOS label when out of scope
    probability: float  # the model's probability for its best intent (known or added)
    score: float  # the method's in-scope score
    candidates: list[tuple[str, float]]  # best two intents and their probabilities (nearest one when OOS)


@dataclass
class OpenSetDetector:
    """A fitted detector: see the module docstring. ``means`` rows: trained labels, then added intents."""

    method: str
    threshold: float
    feature_threshold: float
    ambiguity_margin: float
    labels: list[str]
    oos_label: str
    means: np.ndarray
    precision: np.ndarray
    bank: np.ndarray | None = None
    k: int = 10
    added: list[AddedIntent] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # The temperature the msp/energy thresholds were fitted at (their scores read logits / temperature).
    # None (a detector built in code): the Predictor that loads it gives it the run's own.
    temperature: float | None = None

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS or bool(self.added)

    @property
    def all_labels(self) -> list[str]:
        return [*self.labels, *(intent.label for intent in self.added)]

    # --- scores -------------------------------------------------------------------------------------
    def mahalanobis_distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` to each class mean: ``(texts, classes)``.

        In torch, on the model's own thread pool: NumPy's BLAS would start a second pool of threads that
        competes with the model's for the same cores (a served batch got ~25% slower that way).
        """
        import torch

        with torch.inference_mode():
            z = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
            means = torch.from_numpy(np.ascontiguousarray(self.means, dtype=np.float32))
            precision = torch.from_numpy(np.ascontiguousarray(self.precision, dtype=np.float32))
            zp = z @ precision
            own = (zp * z).sum(dim=1, keepdim=True)
            mean_terms = ((means @ precision) * means).sum(dim=1)
            return (own - 2.0 * zp @ means.T + mean_terms[None, :]).double().numpy()

    def scores(self, logits: np.ndarray, features: np.ndarray | None, method: str | None = None) -> np.ndarray:
        """In-scope score of each text with ``method`` (default: the detector's), from the raw ``logits``."""
        temperature = self.temperature or 1.0
        return method_scores(method or self.method, logits / temperature, features, self)

    # --- decisions ----------------------------------------------------------------------------------
    def decide(
        self, logits: np.ndarray, features: np.ndarray | None, *, temperature: float | None = None
    ) -> list[OpenSetDecision]:
        """Decide on each text from the model's raw ``logits`` (and features); ``temperature``: the run's,
        for the probabilities reported (default: the detector's own)."""
        if self.needs_features and features is None:
            raise RunDirError(f"the {self.method} detector needs the model's features, and none were given")
        shown = temperature if temperature is not None else (self.temperature or 1.0)
        probabilities = softmax(logits / shown)
        trained = len(self.labels)
        distances = self.mahalanobis_distances(features) if self.needs_features and features is not None else None
        if self.method == "mahalanobis" and distances is not None:
            scores = -distances.min(axis=1)  # the same distances, not computed twice
        else:
            scores = self.scores(logits, features)
        top_two = np.argsort(-probabilities, axis=1)[:, :2]
        all_labels = self.all_labels
        decisions = []
        for i, row in enumerate(probabilities):
            if self.added and distances is not None and int(distances[i].argmin()) >= trained:
                # Nearest to an added intent: the Gaussian posterior over every class mean ranks the
                # intents, and the feature threshold decides whether it is in scope.
                posterior = softmax(-0.5 * distances[i][None, :])[0]
                ranked = _top_two(all_labels, posterior)
                score = float(-distances[i].min())
                own = self.added[int(distances[i].argmin()) - trained].threshold
                in_scope = score >= (self.feature_threshold if own is None else own)
            else:
                ranked = [(self.labels[j], float(row[j])) for j in top_two[i]]
                score = float(scores[i])
                in_scope = score >= self.threshold
            best_label, best_p = ranked[0]
            if not in_scope:
                decisions.append(OpenSetDecision("out_of_scope", self.oos_label, best_p, score, ranked[:1]))
            elif len(ranked) > 1 and best_p - ranked[1][1] < self.ambiguity_margin:
                decisions.append(OpenSetDecision("ambiguous", best_label, best_p, score, ranked))
            else:
                decisions.append(OpenSetDecision("in_scope", best_label, best_p, score, ranked))
        return decisions


def softmax(logits: np.ndarray) -> np.ndarray:
    # Imported when called: the CLI reads METHODS from this module and must start without torch.
    from tuneforge.models.loading import softmax as _softmax

    return _softmax(logits)


def _top_two(labels: list[str], probabilities: np.ndarray) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities)[:2]
    return [(labels[j], float(probabilities[j])) for j in order]


def normalise_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def method_scores(
    method: str, logits: np.ndarray, features: np.ndarray | None, stats: OpenSetDetector | None
) -> np.ndarray:
    """In-scope scores of ``method``; ``stats`` carries the means, precision and bank the feature methods need."""
    if method == "msp":
        return softmax(logits).max(axis=1)
    if method == "energy":
        top = logits.max(axis=1)
        return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    if features is None or stats is None:
        raise ValueError(f"the {method} score needs features and fitted statistics")
    if method == "mahalanobis":
        return -stats.mahalanobis_distances(features).min(axis=1)
    if method == "knn":
        if stats.bank is None or not len(stats.bank):
            raise ValueError("the knn score needs the training features (the detector's bank)")
        similarities = normalise_rows(np.asarray(features, dtype=np.float32)) @ stats.bank.T
        k = min(stats.k, similarities.shape[1])
        return -np.partition(-similarities, k - 1, axis=1)[:, k - 1]
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")


# --- files ------------------------------------------------------------------------------------------------
def detector_dir(run_path: Path | str) -> Path:
    return Path(run_path) / INTENT_DIR


def has_detector(run_path: Path | str) -> bool:
    return (detector_dir(run_path) / DETECTOR_FILE).is_file()


def save_detector(run_path: Path | str, detector: OpenSetDetector) -> Path:
    """Write ``RUN/intent/`` atomically: a reader sees the old detector or the new one, never half of one."""
    from safetensors.numpy import save_file

    tensors = {
        "means": np.ascontiguousarray(detector.means, dtype=np.float32),
        "precision": np.ascontiguousarray(detector.precision, dtype=np.float32),
    }
    if detector.bank is not None:
        tensors["bank"] = np.ascontiguousarray(detector.bank, dtype=np.float16)
    meta = {
        "format": FORMAT_VERSION,
        "method": detector.method,
        "threshold": detector.threshold,
        "feature_threshold": detector.feature_threshold,
        "ambiguity_margin": detector.ambiguity_margin,
        "labels": detector.labels,
        "oos_label": detector.oos_label,
        "k": detector.k,
        "temperature": detector.temperature,
        "added": [{"label": a.label, "examples": a.examples, "threshold": a.threshold} for a in detector.added],
        **{key: value for key, value in detector.info.items() if key not in _META_KEYS},
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / STATS_FILE))
        (tmp / DETECTOR_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    target = detector_dir(run_path)
    atomic_replace_dir(target, write)
    return target


_META_KEYS = (
    "format",
    "method",
    "threshold",
    "feature_threshold",
    "ambiguity_margin",
    "labels",
    "oos_label",
    "k",
    "temperature",
    "added",
)


def load_detector(run_path: Path | str, labels: list[str] | None = None) -> OpenSetDetector | None:
    """The run's detector, or ``None`` if it has none; a damaged or mismatched one is a ``RunDirError``."""
    folder = detector_dir(run_path)
    meta_path = folder / DETECTOR_FILE
    if not meta_path.is_file():
        return None
    meta = read_versioned_json(meta_path, kind="detector", version=FORMAT_VERSION, hint=_FIT_AGAIN)
    try:
        detector = _from_meta(meta, _read_stats(folder / STATS_FILE))
    except (KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"{meta_path}: damaged ({exc}); {_FIT_AGAIN}") from None
    if labels is not None and detector.labels != list(labels):
        raise RunDirError(
            f"{meta_path}: fitted for other labels than this run's model ({len(detector.labels)} vs {len(labels)}); "
            f"{_FIT_AGAIN}"
        )
    return detector


def _read_stats(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc}); {_FIT_AGAIN}") from None


def _from_meta(meta: dict[str, Any], stats: dict[str, np.ndarray]) -> OpenSetDetector:
    method = meta["method"]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    labels = [str(label) for label in meta["labels"]]
    added = [
        AddedIntent(
            str(a["label"]),
            [str(t) for t in a["examples"]],
            None if a.get("threshold") is None else float(a["threshold"]),
        )
        for a in meta.get("added", [])
    ]
    means = stats["means"].astype(np.float32)
    precision = stats["precision"].astype(np.float32)
    bank = stats["bank"].astype(np.float32) if "bank" in stats else None
    width = means.shape[1] if means.ndim == 2 else -1
    if means.shape[0] != len(labels) + len(added) or precision.shape != (width, width):
        raise ValueError(
            f"statistics of shape {means.shape} / {precision.shape} for {len(labels) + len(added)} intents"
        )
    if method == "knn" and (bank is None or bank.ndim != 2 or bank.shape[1] != width):
        raise ValueError("the knn method needs a bank of training features as wide as the means")
    numbers = {key: float(meta[key]) for key in ("threshold", "feature_threshold", "ambiguity_margin")}
    if not all(np.isfinite(list(numbers.values()))) or not 0.0 <= numbers["ambiguity_margin"] < 1.0:
        raise ValueError(f"thresholds must be finite and the margin in [0, 1): {numbers}")
    # Absent (a file from before calibration): fitted on raw logits. null: a detector built in code.
    temperature = meta.get("temperature", 1.0)
    if temperature is not None:
        temperature = float(temperature)
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"the temperature must be finite and above 0, not {temperature}")
    return OpenSetDetector(
        method=method,
        labels=labels,
        oos_label=str(meta["oos_label"]),
        means=means,
        precision=precision,
        bank=bank,
        k=int(meta.get("k", 10)),
        added=added,
        info={key: value for key, value in meta.items() if key not in _META_KEYS},
        temperature=temperature,
        **numbers,
    )
