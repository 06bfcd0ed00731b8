"""Config validation, overrides, model resolution and weight-safety rules, optimizer groups, schedules."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml

from tuneforge.config import TrainConfig, load_config, validate_config
from tuneforge.errors import ConfigError, ModelError
from tuneforge.files import atomic_write_text
from tuneforge.pretrained import REGISTRY, resolve_model
from tuneforge.train.optim import lr_factor, parameter_groups


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {"data": {"train": "train.csv"}})
    config = load_config(path, ["train.epochs=3", "train.learning_rate=2e-4", "model.hidden_dropout=0.2"])
    assert config.model.name == "minilm-l6"
    assert config.train.epochs == 3 and config.train.learning_rate == 2e-4
    assert config.model.hidden_dropout == 0.2


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.optimiser=adamw"], "train.optimiser: unknown key (allowed: epochs,"),
        (["train.schedule=wavy"], "train.schedule: Input should be 'linear', 'cosine', 'constant' or 'one_cycle'"),
        (["train.optimizer=lion"], "train.optimizer: Input should be 'adamw', 'adafactor' or 'sgd'"),
        (["finetune.method=lora", "finetune.lora.r=0"], "finetune.lora.r: Input should be greater than or equal to 1"),
        (["finetune.method=bitfit"], "finetune.method: Input should be 'full', 'lora', 'adalora'"),
        (["finetune.adalora.target_r=32"], "finetune.adalora: target_r (32) must be below r (12)"),
        (["finetune.adalora.target_r=12"], "finetune.adalora: target_r (12) must be below r (12)"),
        (["train.min_auto_epochs=30"], "train: min_auto_epochs (30) must not exceed max_auto_epochs (20)"),
        (["finetune.method=adapter", "finetune.merge=true"], "finetune: merge: only lora, adalora and ia3"),
        (["finetune.method=lora", "finetune.freeze_layers=2"], "finetune: freeze_layers: only for method full;"),
        (["train.layer_lr_decay=1.5"], "train.layer_lr_decay: Input should be less than or equal to 1"),
        (["train.ema_decay=1.0"], "train.ema_decay: Input should be less than 1"),
        (["finetune.method=adalora", "train.ema_decay=0.999"], "train.ema_decay: not with finetune.method adalora"),
        (["finetune.adapter.bottleneck=0"], "finetune.adapter.bottleneck: Input should be greater than or equal to 1"),
        (["train.adversarial.method=fgsm"], "train.adversarial.method: Input should be 'none', 'fgm' or 'pgd'"),
        (["train.batch_size=0"], "train.batch_size: Input should be greater than or equal to 1"),
        (["model.hidden_dropout=1.5"], "model.hidden_dropout: Input should be less than 1"),
        (["data.encoding=klingon"], "data: unknown encoding 'klingon'"),
        (["banana.split=1"], "banana: unknown key (allowed: model, data, train, finetune, distill, output, intent)"),
        (["train.epochs"], "expected key=value"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, overrides: list[str], expected: str) -> None:
    path = _write(tmp_path, {"data": {"train": "train.csv"}})
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert expected in str(error.value)


def test_missing_required_key_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        validate_config({})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- data\n- train\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: the config must be a mapping of sections \(model, data"):
        load_config(bad)


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.csv").write_text("text,label\n")
    config = load_config(_write(tmp_path / "sub", {"data": {"train": "train.csv"}}))
    assert config.data.train == tmp_path / "sub" / "train.csv"


def test_registry_name_resolves_to_the_packaged_model() -> None:
    folder = Path(resolve_model("minilm-l6"))
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert "minilm-l6" in REGISTRY


def test_pickled_weights_are_refused_without_the_trust_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickled weights \(pytorch_model.bin\).*trust_pickle"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), trust_pickle=True) == str(folder)


def test_hub_id_fails_fast_offline_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"hub is unreachable.*local folder"):
        resolve_model("someone/some-model")
    with pytest.raises(ModelError, match="not a registry name and the folder does not exist"):
        resolve_model("./no/such/folder")


def test_weight_decay_skips_biases_and_layernorm_and_head_gets_its_lr(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    cfg = TrainConfig(learning_rate=1e-4, head_learning_rate=1e-3, weight_decay=0.05)
    groups = parameter_groups(model, cfg, {"classifier.weight", "classifier.bias"})
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        group_names = [names[id(p)] for p in group["params"]]
        for name in group_names:
            no_decay = name.endswith("bias") or "LayerNorm" in name
            assert (group["weight_decay"] == 0.0) == no_decay, name
            assert group["lr"] == (1e-3 if name.startswith("classifier") else 1e-4), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_schedules_have_the_documented_shape() -> None:
    total, warmup = 100, 10
    for schedule in ("linear", "cosine", "constant"):
        curve = [lr_factor(s, total_steps=total, warmup_steps=warmup, schedule=schedule) for s in range(total)]
        assert curve[0] == pytest.approx(0.1) and curve[9] == pytest.approx(1.0)
        assert all(a < b for a, b in pairwise(curve[:10])), "warm-up rises"
        if schedule == "constant":
            assert set(curve[10:]) == {1.0}
        else:
            assert all(a >= b for a, b in pairwise(curve[10:])), "then decays"
    assert lr_factor(55, total_steps=100, warmup_steps=10, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(55, total_steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5))
    )


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    from tuneforge.files import atomic_write_with

    def failing_writer(tmp: Path) -> None:
        tmp.write_text("half")
        raise Boom

    with pytest.raises(Boom):
        atomic_write_with(target, failing_writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary files left behind"


def test_the_readme_config_example_is_a_valid_config() -> None:
    """The annotated config in the README is what newcomers copy: every key in it must still exist."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = validate_config(yaml.safe_load(block))
    raw = yaml.safe_load(block)
    assert config.train.learning_rate == raw["train"]["learning_rate"]
    assert config.finetune.method == raw["finetune"]["method"]


def _classifier_folder(tiny_model_dir: Path, folder: Path, num_labels: int) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=num_labels)
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_a_classifier_checkpoint_with_other_labels_gets_a_fresh_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tuneforge.config import ModelConfig
    from tuneforge.models.loading import load_base_for_classification

    # e.g. a student folder made from a 2-label run, now trained on 3 labels
    folder = _classifier_folder(tiny_model_dir, tmp_path / "two-labels", num_labels=2)
    model, new = load_base_for_classification(ModelConfig(name=str(folder), max_length=32), ["neg", "neu", "pos"])
    assert model.classifier.out_features == 3 and model.config.id2label[2] == "pos"
    assert {"classifier.weight", "classifier.bias"} <= set(new)
    saved = load_file(folder / "model.safetensors")
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[layer], saved[layer])  # the encoder is the checkpoint's


def test_weights_that_do_not_fit_their_config_are_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneforge.config import ModelConfig
    from tuneforge.models.loading import load_base_for_classification

    folder = _classifier_folder(tiny_model_dir, tmp_path / "broken", num_labels=2)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48  # the saved FFN weights are 64 wide
    (folder / "config.json").write_text(json.dumps(config))
    expected = r"intermediate\.dense\.bias has shape \(64,\) in the checkpoint but \(48,\).*6 such weights"
    with pytest.raises(ModelError, match=expected):
        load_base_for_classification(ModelConfig(name=str(folder), max_length=32), ["a", "b"])


def test_sentence_embeddings_are_unit_mean_pools_that_padding_does_not_change(tiny_model_dir: Path) -> None:
    from tuneforge.config import ModelConfig
    from tuneforge.models.loading import sentence_embeddings

    cfg = ModelConfig(name=str(tiny_model_dir), max_length=32)
    short, long = "good film", "a bad sad dull long film that goes on and on 7"
    together = sentence_embeddings(cfg, [short, long, short], batch_size=8)  # short padded to long's length
    alone = sentence_embeddings(cfg, [short], batch_size=8)
    assert together.shape == (3, 32)
    assert torch.allclose(torch.from_numpy(together[0]), torch.from_numpy(alone[0]), atol=1e-5)
    assert torch.allclose(torch.from_numpy(together).norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(torch.from_numpy(together[0]), torch.from_numpy(together[1]), atol=1e-3)
