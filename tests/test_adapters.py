"""Parameter-efficient fine-tuning: what trains, what is saved, and that reloading changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import make_rows
from tuneforge.adapters import (
    METADATA_FILE,
    AdapterBank,
    after_backward,
    apply_method,
    base_classifier,
    check_target_modules,
    extra_loss,
    head_parameter_names,
    load_adapted_classifier,
    load_training_state,
    merge_adapter,
    method_of,
    save_adapter,
    trainable_parameter_count,
    training_state,
)
from tuneforge.config import AdaLoraOptions, AdapterOptions, FinetuneConfig, IA3Options, LoraOptions, PrefixOptions
from tuneforge.errors import ConfigError

torch.set_num_threads(1)
# peft 0.21 calls a transformers 5 method that is deprecated; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LABELS = ["happy", "sad", "meh"]
METHODS = ["lora", "adalora", "ia3", "prefix", "adapter"]
# What the method's own trainable parameters are called (the head aside).
MARKERS = {
    "lora": ".lora_",
    "adalora": ".lora_",
    "ia3": ".ia3_l.",
    "prefix": "prompt_encoder.",
    "adapter": ".adapter.",
}


def finetune(method: str, **options: object) -> FinetuneConfig:
    """Small settings so the tiny model stays tiny."""
    sections = {
        "lora": LoraOptions(r=4, alpha=8.0),
        "adalora": AdaLoraOptions(r=4, target_r=2, alpha=8.0, delta_t=2),
        "ia3": IA3Options(),
        "prefix": PrefixOptions(num_virtual_tokens=4),
        "adapter": AdapterOptions(bottleneck=8),
    }
    config = FinetuneConfig(method=method, **sections)
    for key, value in options.items():
        setattr(getattr(config, method), key, value)
    return config


def classifier(model_dir: Path, labels: list[str] = LABELS, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


@pytest.fixture(scope="module")
def batch(tiny_model_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = make_rows(6, seed=3)
    encoded = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    assert (inputs["attention_mask"] == 0).any(), "the batch should contain padding"
    return inputs, torch.tensor([LABELS.index(label) for _, label in rows])


def train_steps(
    model: torch.nn.Module, batch: tuple[dict, torch.Tensor], steps: int, *, start: int = 0, lr: float = 1e-2
) -> None:
    """The loop's contract: loss (+ extra_loss) → backward → step → after_backward → zero_grad."""
    inputs, labels = batch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in range(start, start + steps):
        loss = F.cross_entropy(model(**inputs).logits, labels)
        extra = extra_loss(model)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        optimizer.step()
        after_backward(model, step)
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


@pytest.mark.parametrize("method", METHODS)
def test_only_the_method_and_the_head_learn(tiny_model_dir: Path, batch, method: str) -> None:
    model = apply_method(classifier(tiny_model_dir), finetune(method), total_steps=10)
    assert method_of(model) == method
    inputs, labels = batch
    model.train()
    F.cross_entropy(model(**inputs).logits, labels).backward()

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    head = head_parameter_names(model)
    assert len(head) == 2 and head <= trainable and all("classifier" in name for name in head)
    own = trainable - head
    assert own and all(MARKERS[method] in name for name in own), sorted(own)
    n_trainable, n_total = trainable_parameter_count(model)
    assert 0 < n_trainable < n_total

    # Two steps: LoRA's B and AdaLoRA's E start at zero, so their partners get a gradient only on step two.
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    train_steps(model, batch, steps=2)
    for name, p in model.named_parameters():
        assert torch.equal(p, initial[name]) != (name in trainable), name


def test_full_fine_tuning_is_left_alone(tiny_model_dir: Path) -> None:
    model = classifier(tiny_model_dir)
    assert apply_method(model, FinetuneConfig(), total_steps=10) is model
    assert method_of(model) == "full"
    assert head_parameter_names(model) == {"classifier.weight", "classifier.bias"}
    assert extra_loss(model) is None and training_state(model) == {}
    after_backward(model, 0)
    with pytest.raises(ConfigError, match=r"^finetune\.merge: "):
        merge_adapter(model)


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reloads_bit_identical(tiny_model_dir: Path, batch, tmp_path: Path, method: str) -> None:
    model = apply_method(classifier(tiny_model_dir), finetune(method), total_steps=10)
    train_steps(model, batch, steps=2)
    inputs, _ = batch
    expected = logits_of(model, inputs)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "stale.bin").write_bytes(b"from an earlier run")
    save_adapter(model, folder, base_model_name=str(tiny_model_dir), labels=LABELS, tokenizer=tokenizer)

    names = {path.name for path in folder.iterdir()}
    assert "stale.bin" not in names, "the folder is replaced as a whole"
    assert "tokenizer.json" in names
    weights = [name for name in names if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    assert metadata["method"] == method
    assert metadata["base_model"] == str(tiny_model_dir)
    assert (metadata["num_labels"], metadata["labels"]) == (3, LABELS)
    assert metadata["options"] == getattr(finetune(method), method).model_dump(mode="json")

    loaded = load_adapted_classifier(folder)
    assert not loaded.training
    assert loaded.config.num_labels == 3 and loaded.config.id2label[1] == "sad"
    assert method_of(loaded) == method
    assert torch.equal(logits_of(loaded, inputs), expected)
    assert trainable_parameter_count(loaded)[0] == 0


@pytest.mark.parametrize("method", METHODS)
def test_padding_does_not_change_a_text_logits(tiny_model_dir: Path, batch, method: str) -> None:
    # Prefix tuning rebuilds the attention mask itself: padded positions must stay invisible.
    model = apply_method(classifier(tiny_model_dir), finetune(method), total_steps=10)
    train_steps(model, batch, steps=1)
    inputs, _ = batch
    row = int(inputs["attention_mask"].sum(dim=1).argmin())
    length = int(inputs["attention_mask"][row].sum())
    alone = {key: value[row : row + 1, :length] for key, value in inputs.items()}
    torch.testing.assert_close(logits_of(model, alone)[0], logits_of(model, inputs)[row], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_merged_model_is_a_plain_transformers_classifier(
    tiny_model_dir: Path, batch, tmp_path: Path, method: str
) -> None:
    model = apply_method(classifier(tiny_model_dir), finetune(method), total_steps=10)
    train_steps(model, batch, steps=3)
    inputs, _ = batch
    expected = logits_of(model, inputs)

    merged = merge_adapter(model)
    merged.save_pretrained(tmp_path / "merged")
    assert {p.name for p in (tmp_path / "merged").iterdir()} == {"config.json", "model.safetensors"}
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert plain.config.id2label[2] == "meh"
    torch.testing.assert_close(logits_of(plain.eval(), inputs), expected, rtol=0, atol=1e-5)
    # Merging works on a copy: the adapted model is untouched and can keep training.
    assert torch.equal(logits_of(model, inputs), expected)


@pytest.mark.parametrize("method", ["prefix", "adapter"])
def test_merging_what_cannot_merge_names_the_key(tiny_model_dir: Path, method: str) -> None:
    model = apply_method(classifier(tiny_model_dir), finetune(method), total_steps=10)
    with pytest.raises(ConfigError, match=rf"^finetune\.merge: .*not {method}"):
        merge_adapter(model)


def test_adalora_allocates_its_rank_budget(tiny_model_dir: Path, batch, tmp_path: Path) -> None:
    total = 12
    model = apply_method(classifier(tiny_model_dir), finetune("adalora"), total_steps=total)
    config = model.peft_config["default"]
    # Fractions of the run become steps: tinit 0.1 → 1, tfinal 0.3 → 3.
    assert (config.total_step, config.tinit, config.tfinal, config.deltaT) == (total, 1, 3, 2)
    model.train()
    penalty = extra_loss(model)
    assert penalty is not None and penalty.ndim == 0 and penalty.item() > 0 and penalty.requires_grad

    train_steps(model, batch, steps=total // 2)
    # Mid-run, the importance scores and rank pattern live outside state_dict(): a resume needs training_state.
    state = training_state(model)
    assert any(key.startswith("rank_pattern/") for key in state)
    scores = [key for key in state if key.startswith("exp_avg_ipt/")]
    assert scores
    other = apply_method(classifier(tiny_model_dir), finetune("adalora"), total_steps=total)
    load_training_state(other, state)
    assert other.peft_config["default"].rank_pattern == config.rank_pattern
    assert torch.equal(other.base_model.rankallocator.exp_avg_ipt[scores[0].split("/", 1)[1]], state[scores[0]])

    train_steps(model, batch, steps=total - total // 2, start=total // 2)
    pattern = config.rank_pattern
    kept = [sum(mask) for mask in pattern.values()]
    assert sum(kept) == 2 * len(pattern)  # the final budget: target_r = 2 per module on average, from r = 4
    pruned = [
        p
        for name, p in model.named_parameters()
        if name.endswith("lora_E.default") and (p == 0).any() and (p != 0).any()
    ]
    assert pruned, "pruned singular values are zero, kept ones are not"

    inputs, _ = batch
    save_adapter(model, tmp_path / "a", base_model_name=str(tiny_model_dir), labels=LABELS)
    assert sum(json.loads((tmp_path / "a" / METADATA_FILE).read_text())["adalora_kept_ranks"].values()) == sum(kept)
    assert torch.equal(logits_of(load_adapted_classifier(tmp_path / "a"), inputs), logits_of(model, inputs))


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (finetune("lora", target_modules=["query", "foo"]), r"^finetune\.lora\.target_modules: 'foo' matches no"),
        (finetune("adalora", target_modules=["querry"]), r"^finetune\.adalora\.target_modules: 'querry' matches"),
        (
            FinetuneConfig(method="ia3", ia3=IA3Options(target_modules=["attention.output"], feedforward_modules=[])),
            r"^finetune\.ia3\.target_modules: 'attention\.output' names a BertSelfOutput, not a Linear layer",
        ),
        (
            FinetuneConfig(method="ia3", ia3=IA3Options(target_modules=["key", "ffn"], feedforward_modules=["ffn"])),
            r"^finetune\.ia3\.target_modules: 'ffn' matches no",
        ),
    ],
)
def test_bad_target_modules_name_the_key(tiny_model_dir: Path, config: FinetuneConfig, pattern: str) -> None:
    model = classifier(tiny_model_dir)
    with pytest.raises(ConfigError, match=pattern) as error:
        check_target_modules(model, config)
    # The message lists what would have worked, and the classifier head is not offered as a target.
    assert "query, key, value, dense (output.dense, intermediate.dense, pooler.dense)" in str(error.value)
    with pytest.raises(ConfigError, match=pattern):
        apply_method(model, config, total_steps=10)
    assert method_of(model) == "full"


def test_methods_that_need_an_architecture_say_so() -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16)
    model = DistilBertForSequenceClassification(config)
    with pytest.raises(ConfigError, match=r"^finetune\.method: prefix needs an encoder"):
        check_target_modules(model, FinetuneConfig(method="prefix"))
    # Bottleneck adapters know DistilBERT's layer names.
    adapted = apply_method(model, finetune("adapter", style="houlsby"), total_steps=1)
    assert sum(".adapter.down.weight" in name for name, _ in adapted.named_parameters()) == 2
    assert head_parameter_names(adapted) == {
        f"{m}.{p}" for m in ("pre_classifier", "classifier") for p in ("weight", "bias")
    }


def test_adapter_bank_serves_tasks_with_their_own_heads_on_one_base(
    tiny_model_dir: Path, batch, tmp_path: Path
) -> None:
    inputs, labels = batch
    tasks = {
        "sentiment": ("lora", LABELS),
        "polarity": ("adapter", ["positive", "negative"]),
        "tone": ("ia3", ["calm", "angry", "sad", "glad"]),
        "urgency": ("adalora", ["low", "medium", "high"]),
        "spam": ("prefix", ["ham", "spam"]),
    }
    folders = {}
    for i, (task, (method, names)) in enumerate(tasks.items()):
        model = apply_method(classifier(tiny_model_dir, names, seed=i), finetune(method), total_steps=10)
        train_steps(model, (inputs, labels % len(names)), steps=2)
        folders[task] = tmp_path / task
        save_adapter(model, folders[task], base_model_name=str(tiny_model_dir), labels=names)
    alone = {task: logits_of(load_adapted_classifier(folder), inputs) for task, folder in folders.items()}

    bank = AdapterBank(folders)
    assert bank.tasks == list(tasks)
    for task in [*tasks, *reversed(tasks)]:  # switching back and forth leaves nothing behind
        logits = bank.logits(task, inputs["input_ids"], inputs["attention_mask"])
        assert logits.shape == (len(inputs["input_ids"]), len(tasks[task][1]))
        assert torch.equal(logits, alone[task])
        assert bank.labels(task) == tasks[task][1]
        assert bank.model(task).config.num_labels == len(tasks[task][1])

    # The base weights exist once: every task computes with the bank's own body tensors, not copies of them.
    body = bank.base.bert
    body_parameters = {id(p) for p in body.parameters()}
    for task in tasks:
        assert body_parameters <= {id(p) for p in bank.model(task).parameters()}
        assert (
            base_classifier(bank.model(task)).bert.embeddings.word_embeddings.weight
            is body.embeddings.word_embeddings.weight
        )
    storages = {p.data_ptr(): p.numel() for task in tasks for p in bank.model(task).parameters()}
    body_size = sum(p.numel() for p in body.parameters())
    assert body_size < sum(storages.values()) < 2 * body_size  # five copies of the body would be 5x
    with pytest.raises(KeyError, match="no adapter loaded for task 'nope'"):
        bank.logits("nope", inputs["input_ids"])
