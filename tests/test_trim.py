"""Vocabulary trimming on a tiny BERT with a WordPiece and with a Unigram (XLM-R style) tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tuneforge.errors import ModelError
from tuneforge.optimize.trim import trim_vocabulary

# Texts the trimmed vocabulary is built from, texts made only of their pieces, and text that needs others.
WORDPIECE_TRAIN = ["the film was great", "a plot so boring", "really superb acting"]
WORDPIECE_KEPT = ["great film", "the acting was boring", "so superb really", "a great great plot"]
WORDPIECE_UNSEEN = "xylophone"

UNIGRAM_TRAIN = ["the cat sat", "abcd abc", "a dog ran", "cats sat"]
UNIGRAM_KEPT = ["the cat ran", "abcd", "sat abc the dog", "cats"]
UNIGRAM_UNSEEN = "zebra"


def _tiny_bert(tokenizer: Any) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    # Not len(tokenizer): the conftest vocabulary lists "a" twice, so its ids have a gap.
    vocab_size = max(tokenizer.get_vocab().values()) + 1

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def _unigram_tokenizer(kind: str) -> Any:
    """An XLM-R-like Unigram tokenizer: <s> <pad> </s> <unk> first, Metaspace, ``<s> $A </s>``.

    The scores make "abcd" segment as ▁ab + cd (-24) rather than ▁abc + d: a trimmed vocabulary that
    lost its lowest piece (q, -100) would score the unknown token at -22 instead of -110, and
    ▁abc + <unk> (-22.5) would then beat ▁ab + cd for a text whose pieces were all kept.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaTokenizer

    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("▁the", -2.0), ("▁cat", -3.0), ("▁sat", -3.5), ("▁dog", -4.0), ("▁ran", -4.0), ("▁a", -2.5)]
    words += [("▁ab", -12.0), ("cd", -12.0), ("▁abc", -0.5), ("s", -3.0), ("▁ze", -5.0), ("bra", -6.0)]
    chars = [(c, {"b": -20.0, "d": -30.0}.get(c, -8.0)) for c in "abcdefghijklmnoprstuvwxyz"]
    chars += [("▁", -4.0), ("q", -100.0)]
    pieces = specials + words + chars + [("<mask>", 0.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    cls = XLMRobertaTokenizer if kind == "xlm-roberta" else PreTrainedTokenizerFast
    return cls(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def _logits(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _check_trim(model: torch.nn.Module, tokenizer: Any, train: list[str], kept: list[str], unseen: str, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    before_tokens = [tokenizer.convert_ids_to_tokens(tokenizer(t).input_ids) for t in kept]
    before_logits = _logits(model, tokenizer, kept)
    assert tokenizer.unk_token_id not in tokenizer(unseen).input_ids  # the full vocabulary knows its pieces

    trimmed, trimmed_tokenizer, report = trim_vocabulary(model, tokenizer, train)

    assert report.vocab_after < report.vocab_before and report.parameters_after < report.parameters_before
    assert trimmed.config.vocab_size == report.vocab_after == trimmed.get_input_embeddings().weight.shape[0]
    # Same pieces (ids renumbered), same logits, for texts whose pieces were all kept.
    assert [trimmed_tokenizer.convert_ids_to_tokens(trimmed_tokenizer(t).input_ids) for t in kept] == before_tokens
    assert torch.allclose(_logits(trimmed, trimmed_tokenizer, kept), before_logits, atol=1e-6)
    # A piece the texts never used is now the unknown token.
    assert trimmed_tokenizer.unk_token_id in trimmed_tokenizer(unseen).input_ids
    assert trimmed_tokenizer.pad_token_id == trimmed.config.pad_token_id
    assert trimmed_tokenizer.convert_ids_to_tokens(trimmed_tokenizer.pad_token_id) == tokenizer.pad_token

    folder = tmp_path / "trimmed"
    trimmed.save_pretrained(folder)
    trimmed_tokenizer.save_pretrained(folder)
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert [reloaded_tokenizer(t).input_ids for t in kept] == [trimmed_tokenizer(t).input_ids for t in kept]
    assert torch.allclose(_logits(reloaded, reloaded_tokenizer, kept), before_logits, atol=1e-6)
    return report


def test_wordpiece_trim_keeps_predictions_for_known_texts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _tiny_bert(tokenizer)
    original = tmp_path / "original"
    model.save_pretrained(original)
    report = _check_trim(model, tokenizer, WORDPIECE_TRAIN, WORDPIECE_KEPT, WORDPIECE_UNSEEN, tmp_path)
    assert report.texts == len(WORDPIECE_TRAIN)
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("original", "trimmed")}
    assert size["trimmed"] < size["original"]


@pytest.mark.parametrize("kind", ["generic", "xlm-roberta"])
def test_unigram_trim_keeps_predictions_for_known_texts(kind: str, tmp_path: Path) -> None:
    tokenizer = _unigram_tokenizer(kind)
    assert tokenizer.tokenize("abcd") == ["▁ab", "cd"]
    model = _tiny_bert(tokenizer)
    report = _check_trim(model, tokenizer, UNIGRAM_TRAIN, UNIGRAM_KEPT, UNIGRAM_UNSEEN, tmp_path)
    assert report.vocab_after < report.vocab_before


def test_trim_reports_and_keeps_special_ids(tmp_path: Path) -> None:
    tokenizer = _unigram_tokenizer("generic")
    model = _tiny_bert(tokenizer)
    _, trimmed_tokenizer, _ = trim_vocabulary(model, tokenizer, ["the cat"])
    ids = trimmed_tokenizer("the cat").input_ids
    # <s> <pad> </s> <unk> come first and stay where they were; <mask> moves down with the rows.
    assert ids[0] == 0 and ids[-1] == 2 and trimmed_tokenizer.unk_token_id == 3
    assert trimmed_tokenizer.convert_ids_to_tokens(ids) == ["<s>", "▁the", "▁cat", "</s>"]
    assert trimmed_tokenizer.mask_token_id == len(trimmed_tokenizer) - 1


def test_bpe_tokenizer_is_refused() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model = _tiny_bert(tokenizer)
    with pytest.raises(ModelError, match="supports WordPiece and Unigram tokenizers, not BPE"):
        trim_vocabulary(model, tokenizer, ["ab"])
    assert model.get_input_embeddings().weight.shape[0] == 4  # refused before anything changed


@pytest.mark.parametrize("processor", ["template", "roberta", "bert"])
def test_special_tokens_after_the_pieces_are_renumbered(processor: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("▁the", -2.0), ("▁cat", -3.0), ("▁dog", -3.0), ("▁", -4.0)]
    pieces += [(c, -8.0) for c in "acdeghot"] + [("<pad>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    ids = {piece: i for i, (piece, _) in enumerate(pieces)}
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    cls, sep = ("<s>", ids["<s>"]), ("</s>", ids["</s>"])
    if processor == "template":
        backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[cls, sep])
    else:
        backend.post_processor = (
            processors.RobertaProcessing if processor == "roberta" else processors.BertProcessing
        )(sep, cls)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    model = _tiny_bert(tokenizer)

    trimmed, trimmed_tokenizer, _ = trim_vocabulary(model, tokenizer, ["the cat"])

    encoded = trimmed_tokenizer("the cat the dog").input_ids
    assert trimmed_tokenizer.convert_ids_to_tokens(encoded) == ["<s>", "▁the", "▁cat", "▁the", "<unk>", "</s>"]
    # <unk> ▁the ▁cat <pad> <s> </s>, and the lowest-scoring piece that keeps the unknown token's score.
    assert max(encoded) < trimmed.config.vocab_size == len(trimmed_tokenizer) == 7


def test_tied_output_embeddings_are_trimmed_with_the_input_ones() -> None:
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = _unigram_tokenizer("generic")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    batch = tokenizer(UNIGRAM_KEPT[0], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits

    trimmed, trimmed_tokenizer, _ = trim_vocabulary(model, tokenizer, UNIGRAM_TRAIN)

    assert trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight
    with torch.no_grad():
        after = trimmed(**trimmed_tokenizer(UNIGRAM_KEPT[0], return_tensors="pt")).logits
    kept = tokenizer.convert_tokens_to_ids(trimmed_tokenizer.convert_ids_to_tokens(list(range(len(trimmed_tokenizer)))))
    assert after.shape[-1] == len(kept) and torch.allclose(before[..., kept], after, atol=1e-5)
