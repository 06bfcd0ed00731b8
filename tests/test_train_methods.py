"""Training with adapter methods, regularizers and optimizers, end to end on the tiny BERT."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import make_rows, tiny_config
from tests.fault_injection import run_cli, run_cli_killed_at
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError
from tuneforge.infer.evaluate import evaluate_file
from tuneforge.infer.predictor import Predictor
from tuneforge.models.runs import load_run_classifier
from tuneforge.rundir import RunDir
from tuneforge.train.loop import train

SMALL = {
    "lora": {"r": 4},
    "adalora": {"r": 4, "target_r": 2, "delta_t": 2},
    "adapter": {"bottleneck": 8},
    "ia3": {},
    "prefix": {"num_virtual_tokens": 4},
}


def _method_config(tiny_model_dir: Path, tiny_data: dict, out: Path, method: str, **finetune: object) -> dict:
    raw = tiny_config(tiny_model_dir, tiny_data, out, epochs=2)
    raw["finetune"] = {"method": method, method: SMALL[method], **finetune}
    return raw


@pytest.mark.parametrize("method", list(SMALL))
def test_adapter_run_saves_the_adapter_and_reloads_to_identical_predictions(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, method: str
) -> None:
    out = tmp_path / "run"
    result = train(validate_config(_method_config(tiny_model_dir, tiny_data, out, method)), show_progress=False)

    run = RunDir(out)
    assert run.has_adapter and not run.has_full_model, "the adapter is stored apart from the base model"
    manifest = json.loads((run.adapter_dir / "tuneforge_adapter.json").read_text())
    assert manifest["method"] == method and manifest["labels"] == ["happy", "meh", "sad"]
    assert not list(run.adapter_dir.glob("*.bin")) and list(run.adapter_dir.glob("*.safetensors"))
    info = result.metrics["train"]
    assert 0 < info["trainable_parameters"] < info["total_parameters"]

    texts = [text for text, _ in make_rows(20, seed=5)]
    first = np.array(Predictor(out).predict_proba(texts))
    second = np.array(Predictor(out).predict_proba(texts))
    assert np.array_equal(first, second)
    metrics, _ = evaluate_file(out, tiny_data["test"])
    assert metrics["accuracy"] == result.metrics["test"]["accuracy"]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merge_writes_a_plain_model_with_the_adapters_predictions(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, method: str
) -> None:
    out = tmp_path / "run"
    train(validate_config(_method_config(tiny_model_dir, tiny_data, out, method, merge=True)), show_progress=False)
    run = RunDir(out)
    assert run.has_adapter and run.has_full_model
    plain = AutoModelForSequenceClassification.from_pretrained(run.model_dir).eval()
    adapted, tokenizer = load_run_classifier(run, prefer="adapter")
    batch = tokenizer(["the film was great", "awful plot"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(plain(**batch).logits, adapted(**batch).logits, atol=1e-5)


def test_only_head_and_adapter_weights_change(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(validate_config(_method_config(tiny_model_dir, tiny_data, out, "lora", merge=True)), show_progress=False)
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(out / "model" / "model.safetensors")
    changed = {k for k in base if f"bert.{k}" in merged and not torch.equal(base[k], merged[f"bert.{k}"])}
    # LoRA (r=4 on query, key, value, output.dense, intermediate.dense) moved exactly the targeted weights.
    assert changed and all(k.endswith("weight") for k in changed)
    assert all(any(t in k for t in ("query", "key", "value", "dense")) for k in changed)
    assert not any("embeddings" in k or "LayerNorm" in k for k in changed)


def test_adalora_resume_after_sigkill_is_exact(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    configs = {}
    for name in ("straight", "killed"):
        raw = _method_config(tiny_model_dir, tiny_data, tmp_path / name, "adalora")
        raw["train"]["epochs"] = 3
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))
    assert run_cli(["train", str(configs["straight"]), "--no-progress"]).returncode == 0
    killed = run_cli_killed_at(11, ["train", str(configs["killed"]), "--no-progress"])
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(["train", str(configs["killed"]), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_target_module_fails_before_touching_the_run_dir(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"labels.json": '["a", "b"]', "config.yaml": "earlier run"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    raw = _method_config(tiny_model_dir, tiny_data, out, "adalora")
    raw["finetune"]["adalora"]["target_modules"] = ["query", "no_such_layer"]
    with pytest.raises(ConfigError, match=r"finetune\.adalora\.target_modules: 'no_such_layer' matches no"):
        train(validate_config(raw), overwrite=True, show_progress=False)
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier
    assert not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize(
    "train_overrides",
    [
        {"rdrop_alpha": 1.0},
        {"adversarial": {"method": "fgm", "epsilon": 0.5}},
        {"adversarial": {"method": "pgd", "epsilon": 0.5, "steps": 2, "step_size": 0.2}},
        {"optimizer": "adafactor", "schedule": "one_cycle", "warmup_ratio": 0.3},
        {"optimizer": "sgd", "learning_rate": 0.1, "head_learning_rate": 0.1, "schedule": "cosine"},
    ],
    ids=["rdrop", "fgm", "pgd", "adafactor-one-cycle", "sgd-cosine"],
)
def test_regularizers_and_optimizers_train_and_change_the_result(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, train_overrides: dict
) -> None:
    plain = train(
        validate_config(tiny_config(tiny_model_dir, tiny_data, tmp_path / "a", epochs=1)), show_progress=False
    )
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "b", epochs=1)
    raw["model"]["hidden_dropout"] = 0.1
    raw["train"].update(train_overrides)
    other = train(validate_config(raw), show_progress=False)
    assert other.metrics["train"]["steps"] == plain.metrics["train"]["steps"]
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)


def test_distillation_trains_a_student_from_a_teacher_run(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    from tuneforge.optimize.distill import make_student

    teacher_dir = tmp_path / "teacher"
    train(validate_config(tiny_config(tiny_model_dir, tiny_data, teacher_dir, epochs=2)), show_progress=False)
    student = make_student(AutoModelForSequenceClassification.from_pretrained(teacher_dir / "model"), 1)
    student.save_pretrained(tmp_path / "student-init")
    AutoTokenizer.from_pretrained(teacher_dir / "model").save_pretrained(tmp_path / "student-init")

    results = {}
    for alpha in (0.0, 1.0):
        raw = tiny_config(tmp_path / "student-init", tiny_data, tmp_path / f"student-{alpha}", epochs=1)
        raw["distill"] = {"teacher": str(teacher_dir), "alpha": alpha, "temperature": 2.0}
        results[alpha] = train(validate_config(raw), show_progress=False)
    assert (
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "student-1.0" / "model").config.num_hidden_layers
        == 1
    )
    a = load_file(tmp_path / "student-0.0" / "model" / "model.safetensors")
    b = load_file(tmp_path / "student-1.0" / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a), "learning from the teacher's soft targets changes training"


def test_resumed_distillation_reuses_the_kept_teacher_logits(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    teacher_dir = tmp_path / "teacher"
    train(validate_config(tiny_config(tiny_model_dir, tiny_data, teacher_dir, epochs=1)), show_progress=False)
    configs = {}
    for name in ("straight", "killed"):
        raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / name, epochs=3)
        raw["distill"] = {"teacher": str(teacher_dir), "alpha": 0.7}
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))
    assert run_cli(["train", str(configs["straight"]), "--no-progress"]).returncode == 0
    killed = run_cli_killed_at(11, ["train", str(configs["killed"]), "--no-progress"])
    assert killed.returncode == -signal.SIGKILL
    assert RunDir(tmp_path / "killed.partial").teacher_logits_file.is_file()

    # Without the teacher's weights the resumed run can only have used the kept logits.
    shutil.rmtree(teacher_dir / "model")
    resumed = run_cli(["train", str(configs["killed"]), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "reusing the teacher's logits" in resumed.stderr
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "killed" / "checkpoints").exists(), "the kept logits go with the checkpoint"


def test_kept_teacher_logits_are_used_only_for_the_same_teacher_and_texts(tmp_path: Path) -> None:
    from tuneforge.config import DistillConfig
    from tuneforge.train.distill import load_teacher_logits, save_teacher_logits

    path = tmp_path / "checkpoints" / "teacher_logits.safetensors"
    texts, logits = ["good", "bad", "fine"], torch.randn(3, 2)
    cfg = DistillConfig(teacher=tmp_path / "teacher")
    save_teacher_logits(path, logits, cfg, texts)
    assert torch.equal(load_teacher_logits(path, cfg, texts), logits)
    assert load_teacher_logits(path, cfg, ["good", "bad", "fine!"]) is None
    assert load_teacher_logits(path, DistillConfig(teacher=tmp_path / "other"), texts) is None
    assert load_teacher_logits(tmp_path / "missing.safetensors", cfg, texts) is None
    path.write_bytes(b"not a safetensors file")
    assert load_teacher_logits(path, cfg, texts) is None


def test_teacher_with_other_labels_is_refused(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    from tests.conftest import write_csv

    other = {"train": write_csv(tmp_path / "two.csv", make_rows(60, seed=3, labels=("happy", "sad")))}
    train(validate_config(tiny_config(tiny_model_dir, other, tmp_path / "teacher", epochs=1)), show_progress=False)
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "student", epochs=1)
    raw["distill"] = {"teacher": str(tmp_path / "teacher")}
    with pytest.raises(ConfigError, match=r"distill\.teacher: .* same labels"):
        train(validate_config(raw), show_progress=False)
    assert not (tmp_path / "student").exists()
