"""One validated schema for a whole tuneforge run.

A run is described by one YAML file; ``--set key=value`` overrides any key from the command line.
Unknown keys and bad values fail here, before any work, with a message naming the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from tuneforge.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute(path: Path | None) -> str | None:
    # A run saves its config with absolute paths, so that it names the same files from any working
    # directory (optimize retrains from it, evaluate and resume compare against it).
    return None if path is None else str(path.absolute())


class ModelConfig(_Section):
    name: str = Field(
        "minilm-l6",
        description="Registry name (minilm-l6), a local Hugging Face folder, or a hub id (online only).",
    )
    max_length: int = Field(128, ge=8, description="Tokens per text; longer texts are truncated.")
    trust_pickle: bool = Field(False, description="Allow loading pickled .bin/.pt weights. Only for files you trust.")
    hidden_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None keeps the model's.")
    attention_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None keeps the model's.")
    classifier_dropout: float | None = Field(None, ge=0.0, lt=1.0)


AugmentOperation = Literal["swap", "delete", "insert", "typo", "case", "neighbour", "paraphrase"]


class AugmentConfig(_Section):
    """Augmented copies of the training split (never of validation or test), made once per run and kept
    in the run directory, so a resumed run reuses them (``tuneforge augment`` writes the same to a file)."""

    operations: list[AugmentOperation] = Field(
        default_factory=lambda: ["swap", "delete", "insert", "typo", "case"],
        min_length=1,
        description="swap, delete, insert (EDA), typo, case (noise), neighbour (word-embedding neighbours), "
        "paraphrase (a small generative model; the paraphrase extra).",
    )
    copies: int = Field(1, ge=1, le=100, description="Copies each operation makes of each text.")
    rate: float = Field(0.1, gt=0.0, le=1.0, description="Share of a text's words (or CJK characters) changed.")
    cjk_units: Literal["characters", "words"] = Field(
        "characters",
        description="What swap, delete and insert move, drop or repeat in CJK text: single characters, or "
        "Chinese words (jieba, the zh extra).",
    )
    seed: int | None = Field(None, description="None: train.seed.")
    balance_below: int | None = Field(
        None, ge=1, description="Augment only the labels with fewer training texts than this; None: all."
    )
    filter_run: Path | None = Field(
        None, description="A run whose model must still give each copy its label (e.g. a teacher); None: no filter."
    )
    min_probability: float = Field(0.5, ge=0.0, le=1.0, description="The filter's bar for a copy's label.")
    neighbour_model: str | None = Field(
        None, description="neighbour: a run directory or model name whose word embeddings to use; None: model.name."
    )
    paraphrase_engine: Literal["auto", "llama_cpp", "transformers"] = Field(
        "auto",
        description="paraphrase: llama_cpp (llama-cpp-python), transformers (slower, needs gguf), or auto "
        "(llama_cpp when installed).",
    )

    @field_serializer("filter_run", when_used="json")
    def _absolute_filter_run(self, path: Path | None) -> str | None:
        return _absolute(path)


class DataConfig(_Section):
    train: Path = Field(..., description="Training file: .csv, .tsv, .jsonl or .parquet.")
    validation: Path | None = Field(None, description="Given validation file; else a split of train.")
    test: Path | None = Field(None, description="Optional test file, evaluated after training.")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = Field("utf-8", description="Text encoding of CSV/TSV/JSONL files, e.g. latin-1.")
    lowercase: bool = False
    chinese_script: Literal["simplified", "traditional"] | None = Field(
        None, description="Convert Chinese text to one script while cleaning (training and prediction); null: as is."
    )
    validation_size: float = Field(0.05, gt=0.0, lt=0.5, description="Used when no validation file.")
    max_train_rows: int | None = Field(None, ge=2, description="Seeded stratified subsample of the training set.")
    drop_conflicts: bool = Field(False, description="Drop texts that carry more than one label.")
    drop_leaked: bool = Field(
        False, description="Drop train rows whose normalised text also occurs in validation/test."
    )
    augment: AugmentConfig | None = Field(None, description="Augment the training split inline; None: off.")
    unlabeled: Path | None = Field(
        None,
        description="Texts without labels (.txt, or a file with text_column and no label column) for "
        "train.semi_supervised.",
    )

    @field_serializer("train", "validation", "test", "unlabeled", when_used="json")
    def _absolute_paths(self, path: Path | None) -> str | None:
        return _absolute(path)

    @model_validator(mode="after")
    def _encoding_exists(self) -> DataConfig:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError as exc:
            raise ValueError(f"unknown encoding {self.encoding!r}") from exc
        return self


class AdversarialConfig(_Section):
    method: Literal["none", "fgm", "pgd"] = Field(
        "none", description="Perturb the word embeddings along the loss gradient and train on both passes."
    )
    epsilon: float = Field(1.0, gt=0.0, description="Norm of the perturbation (FGM) or of its ball (PGD).")
    steps: int = Field(3, ge=1, le=20, description="PGD: ascent steps per batch.")
    step_size: float = Field(0.3, gt=0.0, description="PGD: norm of each ascent step.")


class SelfTrainingConfig(_Section):
    """Self-training: label data.unlabeled with the model, keep the confident labels, train again."""

    method: Literal["self_training"] = "self_training"
    rounds: int = Field(2, ge=1, le=20, description="Rounds of pseudo-labelling after the first training.")
    selection: Literal["threshold", "proportional"] = Field(
        "threshold",
        description="threshold: the texts whose most probable label reaches threshold, capped per label. "
        "proportional: `fraction` of the unlabelled texts, shared out between the labels by `proportions`, "
        "per label those with the highest probability of it; no threshold, so a model that is right but unsure "
        "(little data) still labels texts of every class.",
    )
    fraction: float = Field(
        0.4,
        gt=0.0,
        le=1.0,
        description="proportional: the share of the unlabelled texts round 1 labels; round k labels k x fraction "
        "(at most all of them), as later models are better.",
    )
    proportions: Literal["predicted", "labelled"] = Field(
        "predicted",
        description="proportional: how the texts are shared out between labels: as the labelling model's "
        "predictions over the unlabelled texts (fits a pool whose classes are not balanced like the labelled "
        "set), or as the labelled training split's label counts.",
    )
    threshold: float = Field(
        0.7,
        gt=0.0,
        lt=1.0,
        description="Least probability a pseudo-label needs. Label smoothing caps what a model learns to say "
        "(1 - e + e/labels: 0.90 for 77 labels at the default 0.1), so a threshold near it finds next to nothing.",
    )
    max_per_label: int | None = Field(
        None,
        ge=1,
        description="Most pseudo-labelled texts per label in a round (the most confident first); None: "
        "balance_ratio times the median label's confident count.",
    )
    balance_ratio: float = Field(
        3.0, ge=1.0, description="With max_per_label None: cap per label, as a multiple of the median label's."
    )
    agreement: Literal["none", "neighbour", "centroid"] = Field(
        "none",
        description="A second opinion on each pseudo label, from the pretrained model's sentence embeddings "
        "(no training): neighbour: the label of the most similar labelled training text; centroid: the label "
        "whose labelled texts' mean embedding is most similar. A text whose two labels differ is left out "
        "before the selection. none: the model's label alone.",
    )
    publish: Literal["last", "best"] = Field(
        "last",
        description="Which round becomes the run: the last, or the best on validation (worth it only with a "
        "validation split large enough to tell rounds apart).",
    )
    teacher: Path | None = Field(
        None,
        description="A run that labels the first round (later rounds use the model just trained); None: "
        "the model trained on the labelled data.",
    )

    @model_validator(mode="after")
    def _options_of_the_selection(self) -> SelfTrainingConfig:
        # A setting the chosen selection ignores is a mistake the user should hear of, not a silent no-op.
        # Only a value other than the default counts: a saved config holds every key, defaults included.
        ignored = {
            "threshold": ("fraction", "proportions"),
            "proportional": ("threshold", "max_per_label", "balance_ratio"),
        }[self.selection]
        fields = type(self).model_fields
        named = [key for key in ignored if getattr(self, key) != fields[key].default]
        if named:
            raise ValueError(
                f"{', '.join(named)}: not used by selection {self.selection}; remove it or change selection"
            )
        return self

    @field_serializer("teacher", when_used="json")
    def _absolute_teacher(self, path: Path | None) -> str | None:
        return _absolute(path)


class TrainConfig(_Section):
    epochs: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="None: enough epochs to see ~min_train_samples examples (min_auto_epochs..max_auto_epochs).",
    )
    min_train_samples: int = Field(100_000, ge=1)
    min_auto_epochs: int = Field(
        3, ge=1, description="Fewest epochs when epochs is None: even a large dataset gets a few passes."
    )
    max_auto_epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Peak learning rate of the body (or of the adapter). None: the method's default "
        "(full 1e-4; lora, adalora, adapter 1e-3; ia3 3e-3; prefix 1e-2).",
    )
    head_learning_rate: float | None = Field(
        2e-3, gt=0.0, le=1.0, description="Classifier head's learning rate; None uses learning_rate."
    )
    layer_lr_decay: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Each layer below the top learns this many times as fast as the one above (the "
        "embeddings lowest); 1.0: one lr for the whole body.",
    )
    weight_decay: float = Field(0.01, ge=0.0)
    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (one_cycle cycles it).")
    schedule: Literal["linear", "cosine", "constant", "one_cycle"] = Field(
        "linear", description="one_cycle: warm up for warmup_ratio (0.3 is usual), then anneal to ~0."
    )
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    rdrop_alpha: float = Field(
        0.0, ge=0.0, description="R-Drop: weight of the KL between two dropout passes; 0 disables."
    )
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    semi_supervised: SelfTrainingConfig | None = Field(None, description="Self-training on data.unlabeled; None: off.")
    ema_decay: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Evaluate and save an exponential moving average of the trainable weights with this "
        "decay per step (0.999 averages over the last ~1000 steps); None: the live weights.",
    )
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Evaluations without improvement before stopping; None disables."
    )
    keep: Literal["best", "last"] = Field(
        "best",
        description="Which weights become the run's model: the best on validation, or the last evaluated (the "
        "end of training, or where early stopping stopped it). last suits a validation split too small to "
        "rank checkpoints (a few texts per label), where best picks by noise.",
    )
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    eval_every_steps: int | None = Field(None, ge=1, description="None: evaluate once per epoch.")
    checkpoint_every_steps: int = Field(200, ge=1)
    group_by_length: bool = True
    eval_batch_size: int = Field(128, ge=1)
    calibrate: bool = Field(
        True,
        description="After training, fit a temperature on the validation split's logits so that the "
        "probabilities every loader reports are calibrated (RUN/calibration.json, calibration.png, ECE/Brier/NLL "
        "in metrics.json); false: the raw softmax.",
    )
    seed: int = 42
    threads: int | None = Field(
        None, ge=1, description="torch threads per process; None: the cores shared out among this machine's processes."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: the GPU when torch sees one (each process its own: LOCAL_RANK), else the CPU."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Mixed precision of the forward passes (autocast; the weights and optimizer stay fp32). bf16: "
        "GPUs from Ampere on, or CPUs with AMX/AVX512-BF16 (elsewhere it runs, slower); fp16: CUDA only, with a "
        "loss scaler.",
    )

    @model_validator(mode="after")
    def _epoch_bounds(self) -> TrainConfig:
        if self.min_auto_epochs > self.max_auto_epochs:
            raise ValueError(
                f"min_auto_epochs ({self.min_auto_epochs}) must not exceed max_auto_epochs ({self.max_auto_epochs})"
            )
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs device cuda (or auto on a GPU); on the CPU use bf16 or fp32")
        return self


class LoraOptions(_Section):
    r: int = Field(8, ge=1, le=1024, description="Rank of the low-rank update.")
    alpha: float = Field(16.0, gt=0.0, description="Scale: the update is multiplied by alpha / r.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "key", "value", "output.dense", "intermediate.dense"],
        min_length=1,
        description="Module name suffixes to adapt (matched against the model's Linear layers).",
    )


class AdaLoraOptions(LoraOptions):
    r: int = Field(12, ge=1, le=1024, description="Initial rank of every adapted module (peft init_r).")
    target_r: int = Field(4, ge=1, le=1024, description="Average rank kept after pruning the budget.")
    tinit: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of steps before rank pruning starts.")
    tfinal: float = Field(0.3, ge=0.0, lt=1.0, description="Fraction of final steps at the target budget.")
    delta_t: int = Field(10, ge=1, description="Steps between budget re-allocations.")
    orth_reg_weight: float = Field(0.5, ge=0.0)

    @model_validator(mode="after")
    def _budget(self) -> AdaLoraOptions:
        # Equal ranks leave AdaLoRA nothing to prune, and peft's budget step then fails deep inside training.
        if self.target_r >= self.r:
            raise ValueError(
                f"target_r ({self.target_r}) must be below r ({self.r}); to keep every rank, use method lora"
            )
        if self.tinit + self.tfinal >= 1.0:
            raise ValueError(f"tinit + tfinal ({self.tinit} + {self.tfinal}) must leave steps for pruning (< 1)")
        return self


class AdapterOptions(_Section):
    bottleneck: int = Field(64, ge=1, le=4096, description="Width of the adapter's down-projection.")
    style: Literal["pfeiffer", "houlsby"] = Field(
        "pfeiffer", description="pfeiffer: one adapter after each FFN; houlsby: also after attention."
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class IA3Options(_Section):
    target_modules: list[str] = Field(default_factory=lambda: ["key", "value", "output.dense"], min_length=1)
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["output.dense"],
        description="Subset of target_modules whose inputs (not outputs) are rescaled.",
    )

    @model_validator(mode="after")
    def _feedforward_subset(self) -> IA3Options:
        extra = [m for m in self.feedforward_modules if m not in self.target_modules]
        if extra:
            raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}")
        return self


class PrefixOptions(_Section):
    num_virtual_tokens: int = Field(16, ge=1, le=512)
    projection: bool = Field(True, description="Re-parametrise the prefix through an MLP (more stable).")


class FinetuneConfig(_Section):
    method: Literal["full", "lora", "adalora", "adapter", "ia3", "prefix"] = Field(
        "full", description="full: every weight learns; the others train a small add-on and the head."
    )
    freeze_embeddings: bool = Field(
        True,
        description="Keep the word-embedding matrix fixed (full fine-tuning): faster steps, and words unseen "
        "in training keep their pretrained neighbours (SST-2 dev +1.0 with this default).",
    )
    freeze_layers: int = Field(
        0,
        ge=0,
        description="full: also keep the whole embedding layer and this many transformer blocks nearest "
        "the input fixed; backpropagation stops above them, so steps are faster.",
    )
    merge: bool = Field(
        False, description="Also write the adapter merged into the base model as model/ (lora, adalora, ia3)."
    )
    lora: LoraOptions = Field(default_factory=LoraOptions)
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions)
    adapter: AdapterOptions = Field(default_factory=AdapterOptions)
    ia3: IA3Options = Field(default_factory=IA3Options)
    prefix: PrefixOptions = Field(default_factory=PrefixOptions)

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> FinetuneConfig:
        if self.merge and self.method not in ("lora", "adalora", "ia3"):
            raise ValueError(f"merge: only lora, adalora and ia3 can be merged into the base model, not {self.method}")
        if self.freeze_layers and self.method != "full":
            raise ValueError(f"freeze_layers: only for method full; {self.method} keeps the base model fixed already")
        return self


class TransferDataConfig(_Section):
    """Texts without labels that the teacher labels (its logits only, no hard label): unlabelled texts
    like production traffic and/or augmented copies of the training texts (Jiao et al. 2020)."""

    file: Path | None = Field(
        None, description="Unlabelled texts (.txt, or a file with data.text_column and no label column)."
    )
    augment: AugmentConfig | None = Field(
        None, description="Augmented copies of the training split (no label filter: the teacher labels them)."
    )
    max_texts: int | None = Field(None, ge=1, description="A seeded sample of at most this many transfer texts.")

    @field_serializer("file", when_used="json")
    def _absolute_file(self, path: Path | None) -> str | None:
        return _absolute(path)

    @model_validator(mode="after")
    def _some_source(self) -> TransferDataConfig:
        if self.file is None and self.augment is None:
            raise ValueError("give file (unlabelled texts), augment (copies of the training texts) or both")
        return self


class DistillConfig(_Section):
    teacher: Path | None = Field(
        None, description="A run directory whose model teaches this one (knowledge distillation); None: off."
    )
    temperature: float = Field(2.0, gt=0.0, description="Softens both distributions before the KL term.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the KL term; 1 - alpha weighs the labels.")
    transfer_data: TransferDataConfig | None = Field(
        None, description="More texts for the teacher to label and the student to learn from; None: none."
    )

    @field_serializer("teacher", when_used="json")
    def _absolute_teacher(self, path: Path | None) -> str | None:
        return _absolute(path)

    @model_validator(mode="after")
    def _transfer_needs_a_teacher(self) -> DistillConfig:
        if self.transfer_data is not None and self.teacher is None:
            raise ValueError("transfer_data: needs a teacher to label it (distill.teacher)")
        return self


class OutputConfig(_Section):
    dir: Path = Field(Path("runs/run"), description="The run directory this run writes.")


# Small encoders want ~1e-4 for full fine-tuning (the usual 2e-5..5e-5 is for BERT-base and up, and
# under-trains a 6-layer model); freshly initialised add-ons with few parameters want 10x or more.
DEFAULT_LEARNING_RATES = {"full": 1e-4, "lora": 1e-3, "adalora": 1e-3, "adapter": 1e-3, "ia3": 3e-3, "prefix": 1e-2}


class IntentConfig(_Section):
    """The intent engine, fitted by ``tuneforge train`` right after training (as ``tuneforge intent fit``)."""

    fit: bool = Field(False, description="After training, fit the out-of-scope detector into RUN/intent/.")
    data: Path | None = Field(
        None, description="Held-out texts for the threshold (OOS ones labelled oos_label); None: the validation split."
    )
    method: Literal["auto", "msp", "energy", "mahalanobis", "knn"] = "auto"
    oos_label: str | None = Field(None, description="Label of the OOS texts in data; None: oos, if present.")
    target_recall: float = Field(0.95, ge=0.5, lt=1.0, description="In-scope recall the threshold keeps.")
    ambiguity_margin: float = Field(0.25, ge=0.0, lt=1.0, description="Top-2 probability gap below which: ambiguous.")

    @field_serializer("data", when_used="json")
    def _absolute_data(self, path: Path | None) -> str | None:
        return _absolute(path)


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    intent: IntentConfig = Field(default_factory=IntentConfig)

    @model_validator(mode="after")
    def _resolve_defaults(self) -> RunConfig:
        if self.train.learning_rate is None:
            self.train.learning_rate = DEFAULT_LEARNING_RATES[self.finetune.method]
        return self

    @model_validator(mode="after")
    def _unlabeled_data_has_a_use(self) -> RunConfig:
        if self.train.semi_supervised is not None and self.data.unlabeled is None:
            raise ValueError("train.semi_supervised: needs data.unlabeled, a file of texts without labels")
        if self.data.unlabeled is not None and self.train.semi_supervised is None:
            raise ValueError(
                "data.unlabeled: set train.semi_supervised to use it (for distillation, give the file as "
                "distill.transfer_data.file)"
            )
        return self

    @model_validator(mode="after")
    def _training_fits_the_method(self) -> RunConfig:
        if self.train.ema_decay is not None and self.finetune.method == "adalora":
            raise ValueError(
                "train.ema_decay: not with finetune.method adalora, whose rank pruning edits the weights in place"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(error: ValidationError, section: tuple[str, ...] = ()) -> str:
    """One line naming every bad key; ``section`` is where the validated model sits in a RunConfig."""
    problems = []
    for item in error.errors():
        loc = (*section, *item["loc"])
        key = ".".join(str(part) for part in loc) or "(config)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key{_allowed_keys_hint(loc)}")
        elif item["type"] == "missing":
            problems.append(f"{key}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            # A whole section (a model-level check) is noise in a one-line message.
            problems.append(f"{key}: {message}" if isinstance(value, dict) else f"{key}: {message} (got {value!r})")
    return "; ".join(problems)


def _allowed_keys_hint(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return f" (allowed: {', '.join(model.model_fields)})"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a raw config dict."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


# The paths a config names, as attribute paths: relative ones are resolved against the config's folder.
_PATH_KEYS = (
    ("data", "train"),
    ("data", "validation"),
    ("data", "test"),
    ("data", "unlabeled"),
    ("data", "augment", "filter_run"),
    ("distill", "teacher"),
    ("distill", "transfer_data", "file"),
    ("distill", "transfer_data", "augment", "filter_run"),
    ("train", "semi_supervised", "teacher"),
    ("intent", "data"),
)


def _paths(config: RunConfig) -> Iterator[tuple[BaseModel, str, Path]]:
    """``(section, key, path)`` for each path the config sets (optional sections that are off are skipped)."""
    for *sections, key in _PATH_KEYS:
        owner: Any = config
        for name in sections:
            owner = getattr(owner, name)
            if owner is None:
                break
        else:
            if (path := getattr(owner, key)) is not None:
                yield owner, key, path


def _validate(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def validate_config(raw: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Validate a raw dict; relative data paths resolve against ``base_dir`` (the YAML's folder)."""
    config = _validate(raw)
    if base_dir is not None:
        for section, key, path in _paths(config):
            if not path.is_absolute() and not path.exists():
                candidate = base_dir / path
                if candidate.exists():
                    setattr(section, key, candidate)
    return config


def validate_data_config(raw: dict[str, Any]) -> DataConfig:
    """Validate a ``data`` section alone (how to read a file), with messages naming ``data.<key>``."""
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, ("data",))) from None


def read_yaml_mapping(
    path: Path, *, what: str = "the config must be a mapping of sections (model, data, train, output)"
) -> dict[str, Any]:
    """The YAML mapping in ``path`` (empty file: ``{}``); a missing file, bad YAML or anything but a mapping is a
    one-line :class:`ConfigError` naming the file. ``what`` says what the file should hold, for that last case."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what}")
    return raw


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides and validate it."""
    path = Path(path)
    raw = apply_overrides(read_yaml_mapping(path), overrides or [])
    return validate_config(raw, base_dir=path.parent)


def load_saved_config(path: Path | str) -> RunConfig:
    """Read and validate the config a run saved beside its model; every message names the file.

    Training saves absolute paths. A relative one (a config edited by hand, or moved with its data)
    names a file next to the config, whatever the working directory; a run saved before paths were
    absolute named them from the training's working directory, which is still tried when the file is
    not next to the config.
    """
    path = Path(path)
    raw = read_yaml_mapping(path)
    try:
        config = _validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base_dir = path.parent.absolute()
    for section, key, value in _paths(config):
        if value.is_absolute():
            continue
        candidate = base_dir / value
        if candidate.exists() or not value.exists():
            setattr(section, key, candidate)
    return config
