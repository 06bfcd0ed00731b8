"""Export a transformers sequence classifier to ONNX, and check it against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from tuneforge.files import atomic_write_with
from tuneforge.models.loading import classifier_head
from tuneforge.models.onnx_runtime import FEATURES_OUTPUT
from tuneforge.models.pruned import sliced_state_dict

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"


class _LogitsAndFeatures(torch.nn.Module):
    """``model(input_ids, attention_mask)`` as a plain two-input module for tracing, with two outputs: the
    logits and the features the classifier head reads (the intent engine's out-of-scope detector needs
    them from the very variant that serves)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = classifier_head(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            handle.remove()
        return logits, captured[0].reshape(logits.shape[0], -1)


def _example_inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second padded, so the traced graph certainly keeps the padding mask."""
    config = model.config
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    pad = getattr(config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    width = 8
    input_ids = (torch.arange(2 * width, dtype=torch.long).reshape(2, width) % max(vocab - 1, 1)) + 1
    attention_mask = torch.ones(2, width, dtype=torch.long)
    attention_mask[1, width // 2 :] = 0
    input_ids[attention_mask == 0] = pad
    return input_ids, attention_mask


def export_onnx(model: torch.nn.Module, path: Path, *, opset: int = 17) -> Path:
    """Write ``model`` (a plain transformers sequence classifier) as ONNX to ``path``, atomically.

    Inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``), outputs ``logits``
    (``[batch, num_labels]``) and ``features`` (``[batch, hidden]``, what the head reads); batch and
    sequence axes are dynamic. Uses the TorchScript exporter
    (``dynamo=False``): no extra dependencies, and it matches PyTorch to ~1e-7 for BERT-like models.
    The file is checked with ``onnx.checker`` before it replaces ``path``.
    """
    import onnx

    path = Path(path)
    was_training = model.training
    model.eval()
    wrapper = _LogitsAndFeatures(model).eval()
    example = _example_inputs(model)
    dynamic_axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        OUTPUT_NAME: {0: "batch"},
        FEATURES_OUTPUT: {0: "batch"},
    }

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad(), sliced_state_dict(model):
            # Expected and harmless here: the legacy-exporter notice, and transformers' shape checks
            # (always true/false for an encoder with a mask) being traced as constants; parity is
            # checked with variable-length padded batches instead (see ``parity``).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=r".*aten::index operator of advanced indexing.*")
            warnings.filterwarnings("ignore", message=r".*The feature will be removed.*")
            torch.onnx.export(
                wrapper,
                example,
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME, FEATURES_OUTPUT],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        onnx.checker.check_model(str(tmp))

    try:
        atomic_write_with(path, write)
    finally:
        model.train(was_training)
    return path


def parity(
    model: torch.nn.Module, onnx_path: Path, encoded: list[list[int]], pad_id: int, *, batch_size: int = 32
) -> float:
    """Largest absolute logit difference between PyTorch and ONNX Runtime on ``encoded``.

    Both run the same length-sorted, right-padded batches, so a lost padding mask or a shape fixed
    at export time shows up as a large difference.
    """
    from tuneforge.models.loading import predict_logits
    from tuneforge.models.onnx_runtime import OnnxClassifier

    if not encoded:
        return 0.0
    reference = predict_logits(model, encoded, pad_id=pad_id, batch_size=batch_size)
    exported = OnnxClassifier(onnx_path, threads=torch.get_num_threads()).logits(
        encoded, pad_id=pad_id, batch_size=batch_size
    )
    return float(np.max(np.abs(reference - exported)))
