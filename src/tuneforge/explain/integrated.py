"""Integrated gradients (captum) on a PyTorch classifier's token embeddings, summed per word.

The path runs from a baseline that keeps the special tokens ([CLS], [SEP]) and replaces every token of a
word by padding, to the text; each token's attribution is integrated along it and summed over the embedding
dimensions, then over the tokens of a word. By completeness the scores add up to p(label | text) -
p(label | baseline), up to the integral's error, which captum reports as the convergence delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.errors import ModelError
from tuneforge.explain.words import Word, align_tokens

# Steps of the path integral (Gauss-Legendre); more makes the delta smaller, and the call slower.
DEFAULT_STEPS = 50
# Path points per forward pass: bounds the memory of a long text on a large model.
_INTERNAL_BATCH = 16


@dataclass(frozen=True)
class Attribution:
    label_index: int
    probability: float  # p(label | text)
    baseline_probability: float  # p(label | baseline): every word padded out
    scores: list[float]  # one per word
    delta: float  # sum(scores) - (probability - baseline_probability)


def torch_model_of(predictor: Any) -> torch.nn.Module:
    """The float PyTorch model behind a Predictor, or a clear error for forms gradients cannot go through."""
    model = getattr(getattr(predictor, "classifier", None), "model", None)
    form = getattr(predictor, "form", "?")
    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"integrated gradients need the PyTorch model, and this run is loaded as {form}: use the occlusion "
            "method (any form), or load the run's PyTorch model (form model or adapter)"
        )
    if any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in model.modules()):
        raise ModelError(
            "integrated gradients need float weights, and this model is int8-quantized (no gradients): use the "
            "occlusion method, or the run the variant was made from"
        )
    return model


def integrated_gradients(
    predictor: Any, text: str, words: list[Word], *, label_index: int | None = None, steps: int = DEFAULT_STEPS
) -> Attribution:
    """Per-word integrated gradients of the label's probability; the label is the model's best one unless given.

    ``predictor``: a :class:`tuneforge.infer.predictor.Predictor` on a PyTorch form (its tokenizer, cleaning
    and token limit are the ones used).
    """
    from captum.attr import LayerIntegratedGradients  # imported on use: only this method needs it

    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    model = torch_model_of(predictor)
    tokenizer = predictor.tokenizer
    alignment = align_tokens(
        tokenizer,
        text,
        words,
        max_length=predictor.max_length,
        lowercase=predictor.lowercase,
        chinese_script=predictor.chinese_script,
    )
    ids = torch.tensor([alignment.input_ids], dtype=torch.long)
    mask = torch.ones_like(ids)
    # Tokens of no word (special ones, a lone SentencePiece "▁") stay as they are: they get exactly 0, and
    # the words' scores alone add up to the difference in probability.
    baseline = torch.tensor(
        [
            [
                token if owner is None else predictor.pad_id
                for token, owner in zip(alignment.input_ids, alignment.word_of_token, strict=True)
            ]
        ],
        dtype=torch.long,
    )
    # A run with a calibration answers softmax(logits / T): explain the probability it answers with.
    temperature = float(getattr(predictor, "temperature", 1.0) or 1.0)
    was_training = model.training
    model.eval()  # no dropout: the path integral needs one deterministic function
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            probabilities = torch.softmax(logits / temperature, dim=-1)[0]
        index = int(probabilities.argmax()) if label_index is None else label_index

        def probability_of_label(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            return torch.softmax(logits / temperature, dim=-1)[:, index]

        method = LayerIntegratedGradients(probability_of_label, model.get_input_embeddings())
        with torch.enable_grad():
            attributions, delta = method.attribute(
                ids,
                baselines=baseline,
                additional_forward_args=(mask,),
                n_steps=steps,
                internal_batch_size=_INTERNAL_BATCH,
                return_convergence_delta=True,
            )
        with torch.no_grad():
            baseline_probability = float(probability_of_label(baseline, mask)[0])
    finally:
        model.train(was_training)
    per_token = attributions.detach().float().sum(dim=-1)[0].tolist()
    scores = [0.0] * len(words)
    for score, owner in zip(per_token, alignment.word_of_token, strict=True):
        if owner is not None:
            scores[owner] += score
    return Attribution(index, float(probabilities[index]), baseline_probability, scores, float(delta[0]))
