"""Apply, train, save, load and merge any fine-tuning method through one small API.

Each method lives in its own module with the same two functions, ``check(model, options)`` and
``wrap(model, options, *, total_steps)``; peft-based methods share ``peft_glue`` for saving and loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from peft import PeftModelForSequenceClassification, PeftType
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from tuneforge.adapters import adalora, bottleneck, ia3, lora, peft_glue, prefix
from tuneforge.adapters.common import METADATA_FILE, head_module_names
from tuneforge.config import AdapterOptions, FinetuneConfig
from tuneforge.errors import ConfigError, ModelError
from tuneforge.files import atomic_replace_dir
from tuneforge.pretrained import quiet_transformers, resolve_model

METHODS: dict[str, ModuleType] = {
    "lora": lora,
    "adalora": adalora,
    "ia3": ia3,
    "prefix": prefix,
    "adapter": bottleneck,
}
MERGEABLE = ("lora", "adalora", "ia3")
_PEFT_METHODS = {
    PeftType.LORA: "lora",
    PeftType.ADALORA: "adalora",
    PeftType.IA3: "ia3",
    PeftType.PREFIX_TUNING: "prefix",
}
# The wrapped model remembers what it is, so saving needs no config (and a loaded adapter can be re-saved).
_OPTIONS_ATTR = "tuneforge_adapter_options"
METADATA_FORMAT = 1


def check_target_modules(model: torch.nn.Module, finetune: FinetuneConfig) -> None:
    """Fail with a ConfigError naming the key if ``finetune`` cannot be applied to ``model`` (a plain classifier)."""
    if finetune.method == "full":
        return
    METHODS[finetune.method].check(model, getattr(finetune, finetune.method))


def apply_method(model: PreTrainedModel, finetune: FinetuneConfig, *, total_steps: int) -> torch.nn.Module:
    """Wrap ``model`` so that only the method's parameters and the head train; "full" returns it unchanged.

    ``total_steps`` (optimizer steps of the whole run) schedules AdaLoRA's rank budget.
    """
    if finetune.method == "full":
        return model
    check_target_modules(model, finetune)
    options = getattr(finetune, finetune.method)
    wrapped = METHODS[finetune.method].wrap(model, options, total_steps=total_steps)
    setattr(wrapped, _OPTIONS_ATTR, (finetune.method, options.model_dump(mode="json")))
    return wrapped


def method_of(model: torch.nn.Module) -> str:
    """The fine-tuning method ``model`` carries: "full" for a plain model, else the adapter's name."""
    remembered = getattr(model, _OPTIONS_ATTR, None)
    if remembered is not None:
        return remembered[0]
    if peft_glue.is_peft_model(model):
        return _PEFT_METHODS[peft_glue.peft_type(model)]
    return "adapter" if bottleneck.is_adapted(model) else "full"


def base_classifier(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers classifier inside ``model`` (itself for "full" and bottleneck adapters)."""
    return model.get_base_model() if peft_glue.is_peft_model(model) else model


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of the trainable head parameters, e.g. for their own learning rate."""
    plain = base_classifier(model)
    head = {id(p) for name in head_module_names(plain) for p in getattr(plain, name).parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head and p.requires_grad}


def after_backward(model: torch.nn.Module, step: int) -> None:
    """Call after ``optimizer.step()`` and before ``optimizer.zero_grad()``; ``step`` is that step's 0-based index.

    AdaLoRA scores its singular values from the gradients and prunes to its budget; a no-op otherwise.
    """
    if method_of(model) == "adalora":
        adalora.after_backward(model, step)


def extra_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """A term to add to the training loss, or None. AdaLoRA: the orthogonality penalty on its factors."""
    if method_of(model) == "adalora" and model.training:
        return adalora.extra_loss(model)
    return None


def training_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Method state outside ``state_dict()`` that an exact resume needs (AdaLoRA's scores); tensors only."""
    return adalora.training_state(model) if method_of(model) == "adalora" else {}


def load_training_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if method_of(model) == "adalora":
        adalora.load_training_state(model, state)


# --------------------------------------------------------------------------- saving and loading


def save_adapter(
    model: torch.nn.Module,
    folder: Path,
    *,
    base_model_name: str,
    labels: list[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Write the adapter, its head, ``tuneforge_adapter.json`` and the tokenizer to ``folder``, atomically.

    ``base_model_name`` is the model name as the config gives it (a registry name or a folder); loading
    resolves it again. The folder is replaced as a whole, so a reader never sees half of it.
    """
    method = method_of(model)
    if method == "full":
        raise ValueError("save_adapter: the model carries no adapter (method full); use save_pretrained")
    num_labels = base_classifier(model).config.num_labels
    if num_labels != len(labels):
        raise ValueError(f"save_adapter: the head has {num_labels} outputs but {len(labels)} labels were given")
    remembered = getattr(model, _OPTIONS_ATTR, (method, {}))
    metadata: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "method": method,
        "base_model": str(base_model_name),
        "num_labels": num_labels,
        "labels": list(labels),
        "options": remembered[1],
    }
    if method == "adalora":
        metadata["adalora_kept_ranks"] = adalora.kept_ranks(model)

    def write(staging: Path) -> None:
        if method == "adapter":
            bottleneck.save(model, staging)
        else:
            peft_glue.save(model, staging)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    atomic_replace_dir(folder, write)


def read_metadata(adapter_dir: Path | str) -> dict[str, Any]:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / METADATA_FILE
    if not path.is_file():
        raise ModelError(f"{adapter_dir}: no {METADATA_FILE}; not a tuneforge adapter folder")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON: {exc}") from None
    missing = [key for key in ("method", "base_model", "num_labels", "labels") if key not in metadata]
    if missing or metadata["method"] not in METHODS:
        raise ModelError(f"{path}: missing {missing} or unknown method {metadata.get('method')!r}")
    return metadata


def load_base(source: str, metadata: dict[str, Any]) -> PreTrainedModel:
    """The base classifier with a head of the adapter's size (its weights come from the adapter)."""
    quiet_transformers()
    labels = list(metadata["labels"])
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=int(metadata["num_labels"]),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the base model {source!r}: {str(exc).splitlines()[0]}") from None


def attach_adapter(model: PreTrainedModel, adapter_dir: Path, metadata: dict[str, Any]) -> torch.nn.Module:
    """Put the saved adapter and head of ``adapter_dir`` on ``model`` (a plain classifier); eval mode."""
    method = metadata["method"]
    if method == "adapter":
        adapted: torch.nn.Module = bottleneck.load(model, adapter_dir, AdapterOptions(**metadata.get("options", {})))
    else:
        config_type = peft_glue.read_config(adapter_dir).peft_type
        if _PEFT_METHODS.get(config_type) != method:
            raise ModelError(f"{adapter_dir}: {METADATA_FILE} says {method} but adapter_config.json is {config_type}")
        model_cls = prefix.PrefixTuningClassifier if method == "prefix" else PeftModelForSequenceClassification
        adapted = peft_glue.load(model, adapter_dir, model_cls)
    setattr(adapted, _OPTIONS_ATTR, (method, metadata.get("options", {})))
    # For inference: peft leaves a loaded prefix trainable, and nothing here should collect gradients.
    adapted.requires_grad_(False)
    adapted.eval()
    return adapted


def load_adapted_classifier(adapter_dir: Path | str, base_source: str | Path | None = None) -> torch.nn.Module:
    """Load the base model named in the adapter's metadata (or ``base_source``), then the adapter and head.

    Returns an eval-mode model whose ``config.num_labels`` and ``config.id2label`` are the adapter's and whose
    ``forward(input_ids=..., attention_mask=...)`` returns ``.logits``. Only safetensors are read.
    """
    adapter_dir = Path(adapter_dir)
    metadata = read_metadata(adapter_dir)
    source = resolve_model(str(base_source if base_source is not None else metadata["base_model"]), trust_pickle=False)
    return attach_adapter(load_base(source, metadata), adapter_dir, metadata)


def merge_adapter(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers classifier with the adapter folded into its weights (lora, adalora, ia3).

    ``save_pretrained`` of the result writes a folder that ``AutoModelForSequenceClassification`` loads as-is.
    ``model`` itself is left unchanged.
    """
    method = method_of(model)
    if method not in MERGEABLE:
        raise ConfigError(f"finetune.merge: only lora, adalora and ia3 can be merged into the base model, not {method}")
    return peft_glue.merge(model)
