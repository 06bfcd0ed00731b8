"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to the layers that need it, via peft.

Training needs three things a plain forward/backward does not give:

- ``after_backward``: peft's ``update_and_allocate`` after every optimizer step (it reads the gradients,
  so before ``zero_grad``) to score each singular value and prune the budget on schedule;
- ``extra_loss``: the orthogonality penalty on P and Q. peft adds it inside forward only when ``labels``
  are passed and the model computes the loss; tuneforge computes the loss from the logits itself;
- ``training_state``: the importance scores and the current rank pattern live outside ``state_dict()``,
  so an exact resume must save and restore them.
"""

from __future__ import annotations

import torch
from peft import AdaLoraConfig, PeftModelForSequenceClassification, TaskType
from transformers import PreTrainedModel

from tuneforge.adapters import peft_glue
from tuneforge.adapters.common import check_suffixes
from tuneforge.config import AdaLoraOptions
from tuneforge.errors import ConfigError

KEY = "finetune.adalora"
_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def check(model: PreTrainedModel, options: AdaLoraOptions) -> None:
    check_suffixes(model, options.target_modules, f"{KEY}.target_modules")


def schedule_steps(options: AdaLoraOptions, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps; rounding down keeps a pruning phase (the fractions sum below 1)."""
    return int(options.tinit * total_steps), int(options.tfinal * total_steps)


def wrap(model: PreTrainedModel, options: AdaLoraOptions, *, total_steps: int) -> PeftModelForSequenceClassification:
    if total_steps < 1:
        raise ConfigError(f"{KEY}: needs the number of training steps to schedule its rank budget (got {total_steps})")
    tinit, tfinal = schedule_steps(options, total_steps)
    config = AdaLoraConfig(
        task_type=TaskType.SEQ_CLS,
        init_r=options.r,
        target_r=options.target_r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=options.delta_t,
        orth_reg_weight=options.orth_reg_weight,
        total_step=total_steps,
    )
    return peft_glue.wrap(model, config)


def _config(model: PeftModelForSequenceClassification) -> AdaLoraConfig:
    return model.peft_config[peft_glue.ADAPTER_NAME]


def after_backward(model: PeftModelForSequenceClassification, step: int) -> None:
    """Score the singular values and prune to the scheduled budget; ``step`` counts optimizer steps from 0."""
    if _config(model).inference_mode:
        return
    with torch.no_grad():
        model.base_model.update_and_allocate(step)


def extra_loss(model: PeftModelForSequenceClassification) -> torch.Tensor | None:
    """``orth_reg_weight`` times the mean of ||PᵀP - I|| and ||QQᵀ - I|| (Frobenius), as peft's forward computes it."""
    config = _config(model)
    if config.inference_mode or config.orth_reg_weight == 0:
        return None
    terms = []
    for name, param in model.base_model.model.named_parameters():
        # AdaLoRA's factors are ParameterDict entries: "<layer>.lora_A.default" (P) and "<layer>.lora_B.default" (Q).
        *_, kind, adapter = name.split(".")
        if adapter != peft_glue.ADAPTER_NAME or kind not in ("lora_A", "lora_B"):
            continue
        gram = param @ param.T if kind == "lora_A" else param.T @ param
        identity = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
        terms.append(torch.linalg.matrix_norm(gram - identity))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()


def kept_ranks(model: PeftModelForSequenceClassification) -> dict[str, int]:
    """Ranks left per adapted layer by the last budget allocation (empty before the first one)."""
    pattern = _config(model).rank_pattern or {}
    return {
        name.replace(".lora_E", "").replace(f".{peft_glue.ADAPTER_NAME}", ""): sum(kept)
        for name, kept in pattern.items()
    }


def training_state(model: PeftModelForSequenceClassification) -> dict[str, torch.Tensor]:
    """Importance scores and rank pattern as flat tensors (safetensors-ready) for an exact resume."""
    state: dict[str, torch.Tensor] = {}
    allocator = model.base_model.rankallocator
    for field in _SCORES:
        for name, tensor in getattr(allocator, field).items():
            state[f"{field}/{name}"] = tensor.detach().clone().contiguous()
    for name, kept in (_config(model).rank_pattern or {}).items():
        state[f"rank_pattern/{name}"] = torch.tensor(kept, dtype=torch.bool)
    return state


def load_training_state(model: PeftModelForSequenceClassification, state: dict[str, torch.Tensor]) -> None:
    allocator = model.base_model.rankallocator
    allocator.reset_ipt()
    pattern: dict[str, list[bool]] = {}
    for key, tensor in state.items():
        field, name = key.split("/", 1)
        if field in _SCORES:
            getattr(allocator, field)[name] = tensor.clone()
        elif field == "rank_pattern":
            pattern[name] = tensor.tolist()
    _config(model).rank_pattern = pattern or None
