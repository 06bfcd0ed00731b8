"""Vocabulary trimming: keep only the word-embedding rows the texts use.

A multilingual model spends most of its size on its vocabulary (multilingual-e5-small: 96M of ~118M
parameters are the 250k-row word embeddings), but a classifier only ever meets the pieces its texts
are made of. Trimming encodes the texts, keeps the ids they use plus every special and added token,
slices the input embedding matrix (and a tied output one) to those rows, and rewrites the tokenizer
with the ids renumbered in their original order; a piece it dropped now reads as the unknown token.

Texts whose pieces are all kept segment exactly as before, so the trimmed model's logits on them are
the original's: WordPiece's greedy longest match only ever chose a kept piece, and a Unigram text's
best Viterbi path is made of kept pieces while every other path only lost candidates. The one way
trimming could add a path is the unknown token where a dropped single-character piece used to be;
its score is (lowest piece score - 10), so the lowest-scoring piece is kept to leave it unchanged,
and such a path then scores below the original path through the dropped character.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import ModelError

SUPPORTED_MODELS = ("WordPiece", "Unigram")
ENCODE_BATCH = 1024
# Files from which a tokenizer class may rebuild its vocabulary instead of reading tokenizer.json:
# stale after trimming, so they are not written next to the trimmed tokenizer.json.
VOCAB_FILES = ("vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")


@dataclass(frozen=True)
class TrimReport:
    vocab_before: int
    vocab_after: int
    parameters_before: int
    parameters_after: int
    texts: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def used_token_ids(tokenizer: Any, texts: Iterable[str]) -> set[int]:
    """Every id the fast ``tokenizer`` gives ``texts``, whole (not truncated), without special tokens."""
    backend = tokenizer.backend_tokenizer
    used: set[int] = set()
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            used.update(i for enc in backend.encode_batch(batch, add_special_tokens=False) for i in enc.ids)
            batch = []
    if batch:
        used.update(i for enc in backend.encode_batch(batch, add_special_tokens=False) for i in enc.ids)
    return used


def _model_state(tokenizer: Any) -> dict[str, Any]:
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelError("vocabulary trimming needs a fast (tokenizers) tokenizer; this model has none")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = state["model"].get("type")
    if kind not in SUPPORTED_MODELS:
        raise ModelError(
            f"vocabulary trimming supports {' and '.join(SUPPORTED_MODELS)} tokenizers, not {kind or 'this one'}: "
            "a BPE vocabulary's merges build pieces from smaller ones, so pieces cannot be dropped on their own"
        )
    return state


def check_trimmable(tokenizer: Any) -> None:
    """Raise ModelError unless ``tokenizer`` is a fast WordPiece or Unigram tokenizer."""
    _model_state(tokenizer)


def _always_kept(state: dict[str, Any], tokenizer: Any) -> set[int]:
    """Ids kept whatever the texts: special and added tokens, and what keeps Unigram's scoring as it was."""
    keep = {int(token["id"]) for token in state.get("added_tokens") or []}
    keep.update(int(i) for i in tokenizer.all_special_ids)
    model = state["model"]
    if model["type"] == "WordPiece":
        keep.add(int(model["vocab"][model["unk_token"]]))
    else:
        pieces = model["vocab"]
        if model.get("unk_id") is not None:
            keep.add(int(model["unk_id"]))
        # The unknown token scores (lowest score - 10): keeping the lowest piece keeps that score.
        keep.add(min(range(len(pieces)), key=lambda i: pieces[i][1]))
        if model.get("byte_fallback"):
            # Unseen characters fall back to byte pieces: all 256 stay, or they would become unknown.
            keep.update(i for i, (piece, _) in enumerate(pieces) if piece.startswith("<0x") and len(piece) == 6)
    return keep


def _remap_processor(processor: dict[str, Any] | None, new_id: dict[int, int]) -> None:
    """Renumber the special-token ids a post-processor inserts, in place."""
    if not processor:
        return
    kind = processor.get("type")
    if kind == "Sequence":
        for item in processor.get("processors", []):
            _remap_processor(item, new_id)
    elif kind == "TemplateProcessing":
        for special in processor.get("special_tokens", {}).values():
            special["ids"] = [new_id[int(i)] for i in special["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            token, old = processor[key]
            processor[key] = [token, new_id[int(old)]]


def _trimmed_state(state: dict[str, Any], kept: list[int]) -> dict[str, Any]:
    new_id = {old: new for new, old in enumerate(kept)}
    model = state["model"]
    if model["type"] == "WordPiece":
        by_id = {int(i): piece for piece, i in model["vocab"].items()}
        model["vocab"] = {by_id[old]: new for old, new in new_id.items() if old in by_id}
    else:
        pieces = model["vocab"]
        model["vocab"] = [pieces[old] for old in kept if old < len(pieces)]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[int(model["unk_id"])]
    for token in state.get("added_tokens") or []:
        token["id"] = new_id[int(token["id"])]
    _remap_processor(state.get("post_processor"), new_id)
    padding = state.get("padding")
    if padding and padding.get("pad_id") is not None:
        padding["pad_id"] = new_id.get(int(padding["pad_id"]), padding["pad_id"])
    return state


def _reload_tokenizer(tokenizer: Any, state: dict[str, Any]) -> Any:
    """The tokenizer as ``AutoTokenizer`` will load it from the trimmed folder: saved and read back,
    so the object measured here is the one ``predict`` and ``serve`` get."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tuneforge-trim-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        for name in VOCAB_FILES:
            (folder / name).unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)


def _slice_embedding(embedding: torch.nn.Embedding, kept: torch.Tensor, padding_idx: int | None) -> torch.nn.Embedding:
    sliced = torch.nn.Embedding(len(kept), embedding.embedding_dim, padding_idx=padding_idx)
    sliced.weight = torch.nn.Parameter(
        embedding.weight.detach()[kept].clone(), requires_grad=embedding.weight.requires_grad
    )
    return sliced.to(embedding.weight.device)


def _trim_model(model: torch.nn.Module, kept: list[int], new_id: dict[int, int]) -> None:
    config = model.config
    index = torch.tensor(kept, dtype=torch.long)
    embedding = model.get_input_embeddings()
    pad = getattr(config, "pad_token_id", None)
    new_pad = new_id.get(int(pad)) if pad is not None else None
    model.set_input_embeddings(_slice_embedding(embedding, index, new_pad))
    output = model.get_output_embeddings()
    if output is not None:
        # A language-model head scores every piece: its rows go with the pieces.
        tied = output.weight is embedding.weight
        output.weight = (
            model.get_input_embeddings().weight if tied else torch.nn.Parameter(output.weight.detach()[index])
        )
        if getattr(output, "bias", None) is not None:
            output.bias = torch.nn.Parameter(output.bias.detach()[index])
        output.out_features = len(kept)
    config.vocab_size = len(kept)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value in new_id:
            setattr(config, key, new_id[value])


def trim_vocabulary(
    model: torch.nn.Module, tokenizer: Any, texts: Iterable[str]
) -> tuple[torch.nn.Module, Any, TrimReport]:
    """Keep the vocabulary ``texts`` use (plus special and added tokens) in ``model`` and ``tokenizer``.

    ``model`` is changed in place and returned; the tokenizer returned is a new one, loaded back from
    the trimmed ``tokenizer.json``. Raises ModelError for tokenizers other than WordPiece and Unigram.
    """
    state = _model_state(tokenizer)
    embedding = model.get_input_embeddings()
    rows = embedding.weight.shape[0]
    texts = list(texts)
    kept_ids = used_token_ids(tokenizer, texts) | _always_kept(state, tokenizer)
    too_big = [i for i in kept_ids if i >= rows]
    if too_big:
        raise ModelError(
            f"the tokenizer gives id {max(too_big)}, but the model's embedding matrix has only {rows} rows: "
            "the tokenizer does not belong to this model"
        )
    kept = sorted(kept_ids)
    parameters_before = sum(p.numel() for p in model.parameters())
    trimmed_tokenizer = _reload_tokenizer(tokenizer, _trimmed_state(state, kept))
    _trim_model(model, kept, {old: new for new, old in enumerate(kept)})
    report = TrimReport(
        vocab_before=rows,
        vocab_after=len(kept),
        parameters_before=parameters_before,
        parameters_after=sum(p.numel() for p in model.parameters()),
        texts=len(texts),
    )
    return model, trimmed_tokenizer, report
