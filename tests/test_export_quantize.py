"""ONNX export, ONNX Runtime inference and int8 quantization, on the tiny random BERT."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import make_rows
from tuneforge.data.batching import collate, encode_texts
from tuneforge.errors import ModelError
from tuneforge.models.loading import predict_logits, predict_logits_and_features
from tuneforge.models.onnx_runtime import OnnxClassifier
from tuneforge.optimize.export import export_onnx, parity
from tuneforge.optimize.quantize import (
    file_size_mb,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    quantize_torch_dynamic,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    # BERT's default init (std 0.02) makes a random tiny model's output all but independent of its input
    # (pooled outputs differ by ~0.3% between texts), so any int8 noise would swamp the signal and
    # "close to fp32" would mean nothing. Fan-in scaled weights make the logits depend on the text.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
                torch.nn.init.normal_(module.bias, std=0.1)
    return model


@pytest.fixture(scope="module")
def pad_id(tiny_model_dir: Path) -> int:
    return AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id


@pytest.fixture(scope="module")
def encoded(tiny_model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [text for text, _ in make_rows(60, seed=7)] + ["ok", "a very long one " * 6]
    ids = encode_texts(tokenizer, texts, max_length=48)
    assert len({len(seq) for seq in ids}) > 5  # really varied lengths
    return ids


@pytest.fixture(scope="module")
def fp32_onnx(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def reference(model: torch.nn.Module, encoded: list[list[int]], pad_id: int) -> np.ndarray:
    return predict_logits(model, encoded, pad_id=pad_id)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_close_to_fp32(logits: np.ndarray, reference: np.ndarray, *, max_relative_error: float) -> None:
    """int8 logits track fp32 ones: error small against how much the logits vary between texts."""
    centered = reference - reference.mean(axis=0)
    spread = float(centered.std())
    assert spread > 0.05, "the reference logits hardly depend on the input: the comparison would be vacuous"
    error = float(np.abs(logits - reference).mean())
    assert error <= max_relative_error * spread, (error, spread)
    correlation = np.corrcoef((logits - logits.mean(axis=0)).ravel(), centered.ravel())[0, 1]
    assert correlation > 0.9, correlation
    assert (logits.argmax(axis=1) == reference.argmax(axis=1)).mean() >= 0.85


def test_export_has_named_dynamic_inputs_and_matches_torch(
    model: torch.nn.Module, fp32_onnx: Path, encoded: list[list[int]], pad_id: int
) -> None:
    graph = onnx.load(str(fp32_onnx)).graph
    assert [node.name for node in graph.input] == ["input_ids", "attention_mask"]
    assert [node.name for node in graph.output] == ["logits", "features"]
    for node in graph.input:
        assert node.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [dim.dim_param for dim in node.type.tensor_type.shape.dim] == ["batch", "sequence"]

    # Length-sorted, right-padded batches of 7: every batch has padding somewhere.
    assert parity(model, fp32_onnx, encoded, pad_id, batch_size=7) <= 1e-4

    session = _session(fp32_onnx)
    for rows in ([encoded[3]], [encoded[i] for i in (0, 10, 20, 30, 61)]):  # batch 1 and 5, mixed lengths
        batch = collate(rows, pad_id)
        with torch.no_grad():
            expected = model(**batch).logits.numpy()
        [got] = session.run(["logits"], {name: tensor.numpy() for name, tensor in batch.items()})
        assert got.shape == (len(rows), 3)
        np.testing.assert_allclose(got, expected, atol=1e-4)

    # The features output is what the head reads, as the PyTorch path captures it, row for row.
    onnx_logits, onnx_features = OnnxClassifier(fp32_onnx).logits_and_features(encoded, pad_id=pad_id, batch_size=7)
    torch_logits, torch_features = predict_logits_and_features(model, encoded, pad_id=pad_id, batch_size=5)
    assert onnx_features.shape == torch_features.shape == (len(encoded), model.config.hidden_size)
    np.testing.assert_allclose(onnx_features, torch_features, atol=1e-4)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    assert float(torch_features.std(axis=0).mean()) > 1e-3, "features that do not vary would make the check vacuous"


def test_export_is_atomic_and_restores_training_mode(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "model.onnx"
    model.train()
    try:
        export_onnx(model, target)
        assert model.training
    finally:
        model.eval()
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]  # no temp file left behind
    before = target.read_bytes()

    def broken_check(*args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("simulated failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken_check)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(model, target)
    assert target.read_bytes() == before  # the earlier file survives a failed export
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]


def test_onnx_classifier_matches_predict_logits_in_input_order(
    fp32_onnx: Path, encoded: list[list[int]], pad_id: int, reference: np.ndarray
) -> None:
    classifier = OnnxClassifier(fp32_onnx, threads=1)
    assert classifier.num_labels == 3
    for batch_size in (1, 5, 64):
        logits = classifier.logits(encoded, pad_id=pad_id, batch_size=batch_size)
        assert logits.dtype == np.float32 and logits.shape == (len(encoded), 3)
        np.testing.assert_allclose(logits, reference, atol=1e-4)
    reversed_logits = classifier.logits(encoded[::-1], pad_id=pad_id)
    np.testing.assert_allclose(reversed_logits, reference[::-1], atol=1e-4)
    assert classifier.logits([], pad_id=pad_id).shape == (0, 3)


def test_dynamic_int8_is_smaller_and_close_to_fp32(
    fp32_onnx: Path, tmp_path: Path, encoded: list[list[int]], pad_id: int, reference: np.ndarray
) -> None:
    target = quantize_onnx_dynamic(fp32_onnx, tmp_path / "dynamic.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["dynamic.onnx"]  # pre-processing leftovers cleaned up
    assert file_size_mb(target) < file_size_mb(fp32_onnx)
    ops = {node.op_type for node in onnx.load(str(target)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    logits = OnnxClassifier(target, threads=1).logits(encoded, pad_id=pad_id)
    _assert_close_to_fp32(logits, reference, max_relative_error=0.5)


def test_static_int8_is_smaller_and_close_to_fp32(
    fp32_onnx: Path, tmp_path: Path, encoded: list[list[int]], pad_id: int, reference: np.ndarray
) -> None:
    target = quantize_onnx_static(fp32_onnx, tmp_path / "static.onnx", encoded[:40], pad_id, batch_size=8)
    assert [p.name for p in tmp_path.iterdir()] == ["static.onnx"]
    assert file_size_mb(target) < file_size_mb(fp32_onnx)
    graph = onnx.load(str(target)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)  # QDQ format
    logits = OnnxClassifier(target, threads=1).logits(encoded, pad_id=pad_id)
    _assert_close_to_fp32(logits, reference, max_relative_error=0.5)
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx_static(fp32_onnx, tmp_path / "none.onnx", [], pad_id)


def test_torch_dynamic_int8_replaces_linear_layers_and_stays_close(
    model: torch.nn.Module, encoded: list[list[int]], pad_id: int, reference: np.ndarray
) -> None:
    linear_count = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation notices are silenced, nothing else is
        quantized = quantize_torch_dynamic(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules()) == linear_count
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == linear_count  # original untouched
    logits = predict_logits(quantized, encoded, pad_id=pad_id)
    _assert_close_to_fp32(logits, reference, max_relative_error=0.5)


def test_missing_or_corrupt_onnx_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        OnnxClassifier(tmp_path / "absent.onnx")
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(ModelError, match="cannot load the ONNX model"):
        OnnxClassifier(corrupt)


def test_file_size_mb_counts_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 500_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 250_000)
    assert file_size_mb(tmp_path / "a.bin") == pytest.approx(0.5)
    assert file_size_mb(tmp_path) == pytest.approx(0.75)
