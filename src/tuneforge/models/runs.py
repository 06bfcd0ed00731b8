"""Load the classifier a run directory holds, whichever form it was saved in.

A full model (``model/``) loads directly and is preferred when present: a merged adapter is as fast
as a plain model. Otherwise the base model named in the run's config is loaded and the run's adapter
(with its trained head) is put on top of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneforge.errors import ModelError, RunDirError
from tuneforge.models.loading import load_classifier
from tuneforge.rundir import RunDir


def run_base_model_name(run: RunDir) -> str:
    """The base model the run was trained from, as named in its config (registry name, folder or hub id)."""
    try:
        saved = yaml.safe_load(run.config_file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise RunDirError(f"{run.path}: no config.yaml, so the adapter's base model is unknown") from None
    name = (saved.get("model") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise RunDirError(f"{run.config_file}: model.name is missing")
    return name


def load_run_classifier(run: RunDir, *, prefer: str = "auto") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The run's classifier in eval mode and its tokenizer. ``prefer``: auto | model | adapter."""
    if prefer not in ("auto", "model", "adapter"):
        raise ValueError(f"prefer must be auto, model or adapter, not {prefer!r}")
    if prefer != "adapter" and run.has_full_model:
        return load_classifier(run.model_dir)
    if prefer != "model" and run.has_adapter:
        from tuneforge.adapters import load_adapted_classifier
        from tuneforge.models.registry import resolve_model

        source = resolve_model(run_base_model_name(run), trust_pickle=False)
        model = load_adapted_classifier(run.adapter_dir, source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(Path(run.adapter_dir))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{run.adapter_dir}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None
        model.eval()
        return model, tokenizer
    raise RunDirError(f"{run.path}: no {'adapter' if prefer == 'adapter' else 'model'} saved in this run")
