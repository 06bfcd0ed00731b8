"""Load the classifier a run directory holds, whichever form it was saved in.

Forms: ``model`` (a plain HF folder: full fine-tuning, a merged adapter, a pruned or distilled model),
``adapter`` (the base model named in the run's config plus the run's adapter and head) and ``onnx``
(an exported, possibly int8, ONNX graph run by ONNX Runtime). ``auto`` takes what an optimized
variant's ``variant.json`` names, else the plain model, else the adapter: a merged adapter is as fast
as a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneforge.errors import ModelError, RunDirError
from tuneforge.models.loading import load_classifier, predict_logits, predict_logits_and_features
from tuneforge.pretrained import resolve_model
from tuneforge.rundir import ONNX_DIR, RunDir

FORMS = ("auto", "model", "adapter", "onnx")
DEVICES = ("cpu", "cuda", "auto")


def inference_device(requested: str) -> torch.device:
    """Where a PyTorch model runs: cpu, cuda (an error without a GPU) or auto (cuda when torch sees one)."""
    if requested not in DEVICES:
        raise ModelError(f"device: must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise ModelError(
            "device: cuda was asked for, but torch sees no GPU (torch.cuda.is_available() is False: a CPU-only "
            f"torch {torch.__version__}, or no driver); use cpu"
        )
    return torch.device("cpu")


class Classifier(Protocol):
    """What inference needs from a model, whatever runs it."""

    @property
    def num_labels(self) -> int: ...

    def logits(self, encoded: list[list[int]], *, pad_id: int, batch_size: int = 64) -> np.ndarray: ...

    @property
    def has_features(self) -> bool: ...

    def logits_and_features(
        self, encoded: list[list[int]], *, pad_id: int, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the feature vectors the classifier head reads; ``ModelError`` if the form has none."""
        ...


@dataclass
class TorchClassifier:
    model: torch.nn.Module

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def logits(self, encoded: list[list[int]], *, pad_id: int, batch_size: int = 64) -> np.ndarray:
        return predict_logits(self.model, encoded, pad_id=pad_id, batch_size=batch_size)

    @property
    def has_features(self) -> bool:
        return True

    def logits_and_features(
        self, encoded: list[list[int]], *, pad_id: int, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        return predict_logits_and_features(self.model, encoded, pad_id=pad_id, batch_size=batch_size)


def run_base_model_name(run: RunDir) -> str:
    """The base model the run was trained from, as named in its config (registry name, folder or hub id)."""
    config = run.config_or_none()
    if config is None:
        raise RunDirError(f"{run.path}: no config.yaml, so the adapter's base model is unknown")
    return config.model.name


def load_run_classifier(run: RunDir, *, prefer: str = "auto") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The run's classifier in eval mode and its tokenizer. ``prefer``: auto | model | adapter."""
    if prefer not in ("auto", "model", "adapter"):
        raise ValueError(f"prefer must be auto, model or adapter, not {prefer!r}")
    if prefer != "adapter" and run.has_full_model:
        return load_classifier(run.model_dir)
    if prefer != "model" and run.has_adapter:
        # Imported here: peft takes seconds to import, and only this form needs it.
        from tuneforge.adapters import load_adapted_classifier

        source = resolve_model(run_base_model_name(run), trust_pickle=False)
        model = load_adapted_classifier(run.adapter_dir, source)
        model.eval()
        return model, _load_tokenizer(run.adapter_dir)
    raise RunDirError(f"{run.path}: no {'adapter' if prefer == 'adapter' else 'model'} saved in this run")


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None


def load_run_backend(
    run: RunDir, *, form: str = "auto", threads: int | None = None, spin: bool = True, device: str = "cpu"
) -> tuple[Classifier, PreTrainedTokenizerBase, str]:
    """The run's classifier behind the common :class:`Classifier` interface, its tokenizer and the form used.

    ``spin`` (ONNX Runtime): idle worker threads busy-wait between ops — lowest latency for batch work,
    but a server that shares the cores with its own HTTP handling does better without it. ``device``:
    cpu, cuda or auto (PyTorch forms: :func:`inference_device`; ONNX: its CUDA provider, onnxruntime-gpu).
    """
    if form not in FORMS:
        raise RunDirError(f"form: must be one of {', '.join(FORMS)}, not {form!r}")
    variant = run.variant()
    if form == "auto":
        form = variant.get("form") or ("model" if run.has_full_model else "adapter" if run.has_adapter else "onnx")
    if form == "onnx":
        if not run.has_onnx:
            raise RunDirError(f"{run.path}: no ONNX model in {ONNX_DIR}/")
        from tuneforge.models.onnx_runtime import OnnxClassifier

        classifier = OnnxClassifier(run.onnx_file, threads=threads, spin=spin, device=device)
        return classifier, _load_tokenizer(run.onnx_file.parent), form
    int8 = form == "model" and variant.get("quantize") == "torch-dynamic-int8"
    where = inference_device("cpu" if int8 and device == "auto" else device)
    model, tokenizer = load_run_classifier(run, prefer=form)
    if int8:
        if where.type != "cpu":
            raise ModelError(f"device: {run.path} is a torch dynamic int8 variant, which runs on the CPU only")
        # int8 PyTorch weights cannot be stored as safetensors, so the variant keeps fp32 weights and
        # quantizes them as it loads (deterministic: the same int8 weights every time).
        from tuneforge.models.quantized import quantize_torch_dynamic

        model = quantize_torch_dynamic(model)
    return TorchClassifier(model.to(where)), tokenizer, form
