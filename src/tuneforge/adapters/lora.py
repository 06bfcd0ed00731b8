"""LoRA (Hu et al. 2021): a trainable low-rank update ``B @ A`` added to chosen Linear layers, via peft."""

from __future__ import annotations

from peft import LoraConfig, PeftModelForSequenceClassification, TaskType
from transformers import PreTrainedModel

from tuneforge.adapters import peft_glue
from tuneforge.adapters.common import check_suffixes
from tuneforge.config import LoraOptions

KEY = "finetune.lora"


def check(model: PreTrainedModel, options: LoraOptions) -> None:
    check_suffixes(model, options.target_modules, f"{KEY}.target_modules")


def wrap(model: PreTrainedModel, options: LoraOptions, *, total_steps: int) -> PeftModelForSequenceClassification:
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
    )
    return peft_glue.wrap(model, config)
