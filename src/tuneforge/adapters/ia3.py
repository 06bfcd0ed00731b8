"""(IA)^3 (Liu et al. 2022): learned vectors that rescale chosen activations, via peft.

Keys and values are rescaled at their output; ``feedforward_modules`` at their input, which is where
the paper puts the feed-forward scaling (after the non-linearity).
"""

from __future__ import annotations

from peft import IA3Config, PeftModelForSequenceClassification, TaskType
from transformers import PreTrainedModel

from tuneforge.adapters import peft_glue
from tuneforge.adapters.common import check_suffixes
from tuneforge.config import IA3Options

KEY = "finetune.ia3"


def check(model: PreTrainedModel, options: IA3Options) -> None:
    check_suffixes(model, options.target_modules, f"{KEY}.target_modules")
    check_suffixes(model, options.feedforward_modules, f"{KEY}.feedforward_modules")


def wrap(model: PreTrainedModel, options: IA3Options, *, total_steps: int) -> PeftModelForSequenceClassification:
    config = IA3Config(
        task_type=TaskType.SEQ_CLS,
        target_modules=list(options.target_modules),
        feedforward_modules=list(options.feedforward_modules),
    )
    return peft_glue.wrap(model, config)
