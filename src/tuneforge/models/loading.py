"""Load a pretrained encoder as a sequence classifier, and run it efficiently on a list of texts."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from tuneforge.config import ModelConfig
from tuneforge.data.batching import collate
from tuneforge.errors import ConfigError, ModelError
from tuneforge.models.pruned import PRUNED_HEADS_KEY, restore_pruning
from tuneforge.pretrained import check_weights_are_safe, model_max_positions, quiet_transformers, resolve_model


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = resolve_model(cfg.name, trust_pickle=cfg.trust_pickle)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name: cannot load the tokenizer of {cfg.name!r}: {str(exc).splitlines()[0]}") from None


def load_base_for_classification(cfg: ModelConfig, labels: list[str]) -> tuple[torch.nn.Module, list[str]]:
    """Load ``cfg.name`` with a fresh head for ``labels``; return the model and its new-parameter names."""
    source = resolve_model(cfg.name, trust_pickle=cfg.trust_pickle)
    quiet_transformers()
    overrides: dict[str, object] = {}
    if cfg.hidden_dropout is not None:
        overrides["hidden_dropout_prob"] = cfg.hidden_dropout
    if cfg.attention_dropout is not None:
        overrides["attention_probs_dropout_prob"] = cfg.attention_dropout
    if cfg.classifier_dropout is not None:
        overrides["classifier_dropout"] = cfg.classifier_dropout
    try:
        model_config = AutoConfig.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            problem_type="single_label_classification",
            **overrides,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name: cannot load {cfg.name!r}: {str(exc).splitlines()[0]}") from None
    limit = model_max_positions(model_config)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"model.max_length: {cfg.max_length} exceeds the model's limit of {limit} tokens")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            config=model_config,
            use_safetensors=not cfg.trust_pickle,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # checked below: only the classifier head may differ
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name: cannot load {cfg.name!r}: {str(exc).splitlines()[0]}") from None
    # A checkpoint that is itself a classifier (a fine-tuned run, a student folder) brings a head for its
    # own labels: that head is replaced, like a missing one. Any other mismatch means a broken folder.
    head, body = [], []
    for key, saved_shape, shape in sorted(info.get("mismatched_keys", ())):
        (head if tuple(shape)[:1] == (len(labels),) else body).append((key, tuple(saved_shape), tuple(shape)))
    if body:
        key, saved_shape, shape = body[0]
        raise ModelError(
            f"model.name: {cfg.name!r}: weight {key} has shape {saved_shape} in the checkpoint but {shape} in its "
            f"config ({len(body)} such weights): the folder's weights and config.json do not match"
        )
    if getattr(model.config, PRUNED_HEADS_KEY, None):
        restore_pruning(model)  # keep pruned heads out while training a pruned model further
    return model, [*info.get("missing_keys", []), *(key for key, _, _ in head)]


@torch.inference_mode()
def sentence_embeddings(
    cfg: ModelConfig,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The pretrained encoder ``cfg.name``'s sentence embeddings: its last hidden states averaged over each
    text's tokens (padding excluded) and scaled to length 1, one row per text, in input order.

    Mean pooling is what sentence-transformers models such as the default all-MiniLM-L6-v2 were trained
    for, so a dot product of two rows is the similarity those models were built to give.
    """
    source = resolve_model(cfg.name, trust_pickle=cfg.trust_pickle)
    tokenizer = load_tokenizer(cfg)
    quiet_transformers()
    try:
        encoder = AutoModel.from_pretrained(source, use_safetensors=not cfg.trust_pickle).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name: cannot load {cfg.name!r}: {str(exc).splitlines()[0]}") from None
    encoded = tokenizer(list(texts), truncation=True, max_length=cfg.max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = np.zeros((len(encoded), encoder.config.hidden_size), dtype=np.float32)
    for indices in _length_sorted_batches(encoded, batch_size):
        batch = collate([encoded[i] for i in indices], pad_id)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        rows[indices] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
        if on_batch is not None:
            on_batch(len(indices))
    return rows


def load_classifier(model_dir: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a fine-tuned classifier folder (safetensors only) for inference."""
    check_weights_are_safe(model_dir, trust_pickle=False)
    quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot load the model: {str(exc).splitlines()[0]}") from None
    if getattr(model.config, PRUNED_HEADS_KEY, None):
        restore_pruning(model)  # a head-pruned model is stored dense; slice the removed heads away again
    model.eval()
    return model, tokenizer


def classifier_head(model: torch.nn.Module) -> torch.nn.Module:
    """The last layer that maps features to the labels: its input is the text's feature vector.

    BERT: ``classifier`` (its input is the pooler's output); DistilBERT: ``classifier`` after
    ``pre_classifier``; RoBERTa: ``classifier.out_proj``; with an adapter, the trained copy of the head.
    A dynamically quantized Linear is no ``nn.Linear`` but keeps ``out_features``, hence the duck typing.
    """
    num_labels = int(model.config.num_labels)
    heads = [
        module
        for module in model.modules()
        if "Linear" in type(module).__name__
        and getattr(module, "out_features", None) == num_labels
        and not any(True for _ in module.children())
    ]
    if not heads:
        raise ModelError(f"{type(model).__name__}: no output layer with {num_labels} outputs found")
    return heads[-1]


class _HeadInputs:
    """Collects what goes into the classifier head during a forward pass (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.captured: torch.Tensor | None = None
        self._handle = classifier_head(model).register_forward_pre_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.captured = args[0]

    def close(self) -> None:
        self._handle.remove()


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    encoded: list[list[int]],
    *,
    pad_id: int,
    batch_size: int = 128,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits for pre-tokenised texts, in input order; batches are length-sorted so padding is minimal.

    ``on_batch`` is called with the number of texts in each finished batch (for a progress bar).
    """
    return _predict(model, encoded, pad_id=pad_id, batch_size=batch_size, on_batch=on_batch)[0]


@torch.inference_mode()
def predict_logits_and_features(
    model: torch.nn.Module, encoded: list[list[int]], *, pad_id: int, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the feature vectors the classifier head reads (e.g. BERT's pooled output), in input order."""
    logits, features = _predict(model, encoded, pad_id=pad_id, batch_size=batch_size, features=True)
    assert features is not None
    return logits, features


def _predict(
    model: torch.nn.Module,
    encoded: list[list[int]],
    *,
    pad_id: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    features: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    was_training = model.training
    model.eval()
    num_labels = model.config.num_labels
    logits = np.zeros((len(encoded), num_labels), dtype=np.float32)
    head_inputs = _HeadInputs(model) if features else None
    feature_rows: np.ndarray | None = None
    # The model's device (a GPU when the caller put it there); a model without parameters runs on the CPU.
    device = next(model.parameters(), torch.empty(0)).device
    try:
        for indices in _length_sorted_batches(encoded, batch_size):
            batch = {key: value.to(device) for key, value in collate([encoded[i] for i in indices], pad_id).items()}
            logits[indices] = model(**batch).logits.float().cpu().numpy()
            if head_inputs is not None and head_inputs.captured is not None:
                captured = head_inputs.captured.float().reshape(len(indices), -1).cpu().numpy()
                if feature_rows is None:
                    feature_rows = np.zeros((len(encoded), captured.shape[1]), dtype=np.float32)
                feature_rows[indices] = captured
            if on_batch is not None:
                on_batch(len(indices))
    finally:
        if head_inputs is not None:
            head_inputs.close()
        model.train(was_training)
    if features and feature_rows is None:
        width = classifier_head(model).in_features
        feature_rows = np.zeros((0, width), dtype=np.float32)
    return logits, feature_rows


def _length_sorted_batches(encoded: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``encoded`` in batches of similar length, longest first, so that padding is minimal."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
