"""PyTorch dynamic int8: applied when a variant is loaded, since int8 PyTorch weights are not safetensors."""

from __future__ import annotations

import warnings

import torch


def quantize_torch_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by a dynamically quantized int8 one.

    The result cannot be saved as safetensors: apply this at load time. ``torch.ao.quantization`` is
    deprecated in torch 2.13 but still the fastest int8 path for eager PyTorch on x86; the ONNX
    Runtime path is the first-class one.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    quantized.eval()
    return quantized
