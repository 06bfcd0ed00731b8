"""Optimisation stage: ONNX export, int8 quantization (ONNX Runtime and torch) and their size helpers.

Submodules are imported explicitly (``tuneforge.optimize.export``, ``tuneforge.optimize.quantize``) so
that importing this package stays cheap.
"""
