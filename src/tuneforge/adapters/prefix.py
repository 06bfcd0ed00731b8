"""Prefix tuning (Li & Liang 2021; P-tuning v2): learned key/value vectors prepended in every attention layer.

peft 0.21's sequence-classification forward does not work with BERT in transformers 5: it looks for a
``past_key_values`` argument on the encoder, which transformers 5 renamed to ``cache``, and fails with
"Model does not support past key values". ``PrefixTuningClassifier`` keeps peft's prefix encoder, saving
and loading, and replaces only that forward:

- the prefix goes in as a ``DynamicCache`` through the model's own forward, so the model's own pooling and
  head run unchanged;
- text tokens keep positions 0..n-1. Passed a cache, BERT would otherwise shift every position by the
  prefix length: the pretrained encoder would see [CLS] at position 16, and ``max_length`` plus the prefix
  would have to fit the position table;
- the prefix is computed once and broadcast over the batch, exactly as peft computes the table it saves,
  so a reloaded adapter gives bit-identical logits.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from peft import PeftModelForSequenceClassification, PrefixTuningConfig, TaskType
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from tuneforge.adapters import peft_glue
from tuneforge.config import PrefixOptions
from tuneforge.errors import ConfigError

KEY = "finetune.prefix"


def _cache_argument(model: PreTrainedModel) -> str | None:
    """The encoder's name for a key/value cache, if it takes one (and the classifier passes it through)."""
    outer = inspect.signature(model.forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in outer):
        return None
    inner = inspect.signature(model.base_model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in inner:
            return name
    return None


def check(model: PreTrainedModel, options: PrefixOptions) -> None:
    if getattr(model.config, "is_encoder_decoder", False) or _cache_argument(model) is None:
        raise ConfigError(
            f"finetune.method: prefix needs an encoder whose attention accepts a key/value cache; "
            f"{type(model.base_model).__name__} does not (use lora, adalora, ia3 or adapter)"
        )


def wrap(model: PreTrainedModel, options: PrefixOptions, *, total_steps: int) -> PrefixTuningClassifier:
    config = PrefixTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=options.num_virtual_tokens,
        prefix_projection=options.projection,
    )
    return peft_glue.wrap(model, config, PrefixTuningClassifier)


def _text_position_ids(model: PreTrainedModel, input_ids: torch.Tensor | None, length: int) -> torch.Tensor:
    embeddings = getattr(model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if input_ids is not None and padding_idx is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        # RoBERTa-style positions start after the padding index and skip padding.
        return embeddings.create_position_ids_from_input_ids(input_ids, padding_idx)
    device = input_ids.device if input_ids is not None else None
    return torch.arange(length, device=device).unsqueeze(0)


class PrefixTuningClassifier(PeftModelForSequenceClassification):
    """peft's prefix-tuning classifier with a forward that works on transformers 5 encoders."""

    def prefix_cache(self, batch_size: int) -> DynamicCache:
        config = self.active_peft_config
        encoder = self.prompt_encoder[self.active_adapter]
        n = config.num_virtual_tokens
        if config.inference_mode:
            # A loaded adapter stores the projected table itself (peft saves the MLP's output).
            table = encoder.embedding.weight.unsqueeze(0)
        else:
            tokens = self.prompt_tokens[self.active_adapter][:n].unsqueeze(0).to(encoder.embedding.weight.device)
            table = encoder(tokens)
        heads = config.num_attention_heads
        # (1, n, layers * 2 * hidden) -> (layers * 2, batch, heads, n, head_dim): one key and one value per layer.
        kv = table.view(1, n, config.num_layers * 2, heads, config.token_dim // heads).permute(2, 0, 3, 1, 4)
        kv = kv.expand(-1, batch_size, -1, -1, -1)
        return DynamicCache(ddp_cache_data=[(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> SequenceClassifierOutput:
        model = self.get_base_model()
        reference = input_ids if input_ids is not None else inputs_embeds
        batch_size, length = reference.shape[:2]
        n = self.active_peft_config.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=reference.device)
        # Every text token may attend to the whole prefix.
        attention_mask = torch.cat([attention_mask.new_ones(batch_size, n), attention_mask], dim=1)
        kwargs.setdefault("position_ids", _text_position_ids(model, input_ids, length))
        kwargs[_cache_argument(model) or "cache"] = self.prefix_cache(batch_size)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        loss = F.cross_entropy(outputs.logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=outputs.logits)
