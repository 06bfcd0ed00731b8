"""Run an exported classifier with ONNX Runtime: the same batching and output order as ``predict_logits``.

Used by inference, so it imports neither ``tuneforge.train`` nor ``tuneforge.optimize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tuneforge.data.batching import collate
from tuneforge.errors import ModelError

_REQUIRED_INPUTS = ("input_ids", "attention_mask")
FEATURES_OUTPUT = "features"
_ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
CUDA_PROVIDER = "CUDAExecutionProvider"


def execution_providers(device: str, available: Sequence[str]) -> list[str]:
    """ONNX Runtime's providers for ``device`` (cpu, cuda, auto) given ``ort.get_available_providers()``:
    CUDA first (the CPU for what it cannot run) when asked for, or for auto when installed (onnxruntime-gpu)."""
    if device not in ("cpu", "cuda", "auto"):
        raise ModelError(f"device: must be cpu, cuda or auto, not {device!r}")
    if device != "cpu" and CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, "CPUExecutionProvider"]
    if device == "cuda":
        raise ModelError(
            f"device: cuda was asked for, but this onnxruntime has no {CUDA_PROVIDER} (it offers "
            f"{', '.join(available) or 'none'}): pip install onnxruntime-gpu, or use device cpu"
        )
    return ["CPUExecutionProvider"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxClassifier:
    """A sequence classifier in a ``.onnx`` file (fp32 or int8), run on the CPU (or a GPU: ``device``).

    ``threads``: intra-op threads (``None``: ONNX Runtime's default, one per physical core). ``spin``:
    let idle worker threads spin between ops — lowest latency, but burns CPU that other work on a
    small machine could use; pass ``False`` when the process shares its cores. ``device``: see
    :func:`execution_providers`.
    """

    def __init__(self, path: Path | str, *, threads: int | None = None, spin: bool = True, device: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: ONNX model file not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One request at a time through a chain of ops: parallelism belongs inside each op.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # errors only: no per-session optimizer chatter
        providers = execution_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
            raise ModelError(f"{self.path}: cannot load the ONNX model: {_first_line(exc)}") from None

        inputs = {node.name: node for node in self.session.get_inputs()}
        missing = [name for name in _REQUIRED_INPUTS if name not in inputs]
        if missing:
            raise ModelError(f"{self.path}: the ONNX model lacks the input(s) {', '.join(missing)}")
        extra = sorted(set(inputs) - {*_REQUIRED_INPUTS, "token_type_ids"})
        if extra:
            raise ModelError(f"{self.path}: the ONNX model needs unsupported input(s) {', '.join(extra)}")
        self._input_types = {}
        for name, node in inputs.items():
            if node.type not in _ORT_INT_TYPES:
                raise ModelError(f"{self.path}: input {name} has type {node.type}, expected int64 or int32")
            self._input_types[name] = _ORT_INT_TYPES[node.type]
        outputs = self.session.get_outputs()
        names = [node.name for node in outputs]
        self._output = "logits" if "logits" in names else names[0]
        # Exports since the intent engine also output what the head reads; older ones have logits only.
        self._features = FEATURES_OUTPUT if FEATURES_OUTPUT in names else None
        shape = next(node.shape for node in outputs if node.name == self._output)
        if len(shape) != 2:
            raise ModelError(f"{self.path}: output {self._output} has shape {shape}, expected (batch, labels)")
        if isinstance(shape[1], int):
            self.num_labels = shape[1]
        else:  # a symbolic label axis: ask the model once
            self.num_labels = int(self._run({"input_ids": np.zeros((1, 1), np.int64)}).shape[1])

    def _run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self._run_outputs(batch, [self._output])[0]

    def _run_outputs(self, batch: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        ids = batch["input_ids"]
        feed = {
            "input_ids": ids,
            "attention_mask": batch.get("attention_mask", np.ones_like(ids)),
            "token_type_ids": np.zeros_like(ids),
        }
        feed = {name: feed[name].astype(dtype, copy=False) for name, dtype in self._input_types.items()}
        return self.session.run(outputs, feed)

    def logits(self, encoded: list[list[int]], *, pad_id: int, batch_size: int = 64) -> np.ndarray:
        """Logits for pre-tokenised texts, in input order; batches are length-sorted so padding is minimal."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        logits = np.zeros((len(encoded), self.num_labels), dtype=np.float32)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = collate([encoded[i] for i in indices], pad_id)
            logits[indices] = self._run({name: tensor.numpy() for name, tensor in batch.items()})
        return logits

    @property
    def has_features(self) -> bool:
        return self._features is not None

    def logits_and_features(
        self, encoded: list[list[int]], *, pad_id: int, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the head's input features, in input order (exports with a ``features`` output)."""
        if self._features is None:
            raise ModelError(
                f"{self.path}: this ONNX export has no '{FEATURES_OUTPUT}' output (exported before the intent "
                "engine); export it again with tuneforge optimize"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        logits = np.zeros((len(encoded), self.num_labels), dtype=np.float32)
        features: np.ndarray | None = None
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = collate([encoded[i] for i in indices], pad_id)
            out_logits, out_features = self._run_outputs(
                {name: tensor.numpy() for name, tensor in batch.items()}, [self._output, self._features]
            )
            if features is None:
                features = np.zeros((len(encoded), out_features.shape[1]), dtype=np.float32)
            logits[indices] = out_logits
            features[indices] = out_features
        return logits, features if features is not None else np.zeros((0, 0), dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, num_labels={self.num_labels})"
