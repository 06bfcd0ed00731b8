"""Nearest neighbours of whole words in a model's own input-embedding space (offline, any model).

The candidates are the vocabulary's whole-word tokens: a lower-case alphabetic word of three letters or
more, not a stop word, that the tokenizer turns back into exactly that one token (so never a WordPiece
continuation such as ``##ing`` nor a special token). A word asks for neighbours only if it is itself one
token; the neighbours are ranked by cosine similarity of the input embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from tuneforge.data.augment import STOP_WORDS
from tuneforge.errors import ModelError
from tuneforge.models.runs import run_base_model_name
from tuneforge.pretrained import check_weights_are_safe, quiet_transformers, resolve_model
from tuneforge.rundir import is_run_dir, open_run_dir

DEFAULT_NEIGHBOURS = 5


class EmbeddingNeighbours:
    """A word -> its ``k`` nearest whole-word neighbours; callable, cached per word."""

    def __init__(
        self,
        embeddings: np.ndarray,
        tokenizer: PreTrainedTokenizerBase,
        *,
        k: int = DEFAULT_NEIGHBOURS,
        min_similarity: float = -1.0,
    ) -> None:
        if k < 1:
            raise ModelError(f"neighbours: must be at least 1, got {k}")
        self.tokenizer = tokenizer
        self.k = k
        self.min_similarity = min_similarity
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self._unit = (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
        ids, words = _whole_word_tokens(tokenizer, len(embeddings))
        self._candidate_ids = np.asarray(ids, dtype=np.int64)
        self._candidate_words = words
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def vocabulary(self) -> frozenset[str]:
        """Every word a neighbour can be."""
        return frozenset(self._candidate_words)

    def __call__(self, word: str) -> Sequence[str]:
        if word not in self._cache:
            self._cache[word] = self._find(word)
        return self._cache[word]

    def _find(self, word: str) -> tuple[str, ...]:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or not len(self._candidate_ids):
            return ()  # split into pieces (or unknown): its embedding is no word's
        similarity = self._unit[self._candidate_ids] @ self._unit[ids[0]]
        order = np.argsort(-similarity, kind="stable")
        found: list[str] = []
        for index in order:
            if similarity[index] < self.min_similarity or len(found) == self.k:
                break
            candidate = self._candidate_words[index]
            if self._candidate_ids[index] != ids[0] and candidate != word.lower():
                found.append(candidate)
        return tuple(found)


def _whole_word_tokens(tokenizer: PreTrainedTokenizerBase, rows: int) -> tuple[list[int], list[str]]:
    specials = set(tokenizer.all_special_tokens)
    ids: list[int] = []
    words: list[str] = []
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token in specials or index >= rows:
            continue
        word = tokenizer.convert_tokens_to_string([token]).strip()
        if len(word) >= 3 and word.isalpha() and word.islower() and word not in STOP_WORDS:
            ids.append(index)
            words.append(word)
    if not words:
        return [], []
    # Keep only what tokenizes back into that same single token (not a word-piece continuation).
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    keep = [i for i, pieces in enumerate(encoded) if list(pieces) == [ids[i]]]
    return [ids[i] for i in keep], [words[i] for i in keep]


def load_neighbours(source: str | Path, *, k: int = DEFAULT_NEIGHBOURS) -> EmbeddingNeighbours:
    """Neighbours from a run directory (its fine-tuned embeddings, or its base model's for an adapter or
    ONNX run) or a model name (registry name, folder or hub id)."""
    if is_run_dir(source):
        run = open_run_dir(source)
        if run.has_full_model:
            folder = run.model_dir
        else:
            # Adapters leave the embeddings as they were; an ONNX variant may have trimmed its vocabulary,
            # so its base model's tokenizer and embeddings are used together.
            folder = _resolve(run_base_model_name(run))
    else:
        folder = _resolve(str(source))
    return EmbeddingNeighbours(*_embeddings_and_tokenizer(folder), k=k)


def _resolve(name: str) -> str:
    try:
        return resolve_model(name)
    except ModelError as exc:
        # Its messages name the config key; here the model comes from the command line.
        raise ModelError(f"neighbour model: {str(exc).removeprefix('model.name: ')}") from None


def _embeddings_and_tokenizer(folder: str | Path) -> tuple[np.ndarray, PreTrainedTokenizerBase]:
    if Path(folder).is_dir():
        check_weights_are_safe(Path(folder), trust_pickle=False)
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the model's word embeddings: {str(exc).splitlines()[0]}") from None
    weight = model.get_input_embeddings().weight.detach().float().numpy()
    return weight, tokenizer
