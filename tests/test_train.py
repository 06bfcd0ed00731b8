"""End-to-end training on a tiny random BERT: the run directory contract, resume after SIGKILL."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.conftest import tiny_config
from tests.fault_injection import run_cli, run_cli_killed_at
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError, RunDirError
from tuneforge.train.loop import auto_epochs, check_same_config, train


def test_train_writes_a_complete_run_directory(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(validate_config(tiny_config(tiny_model_dir, tiny_data, out, epochs=8)), show_progress=False)

    for name in ("labels.json", "config.yaml", "audit.json", "metrics.json", "train_log.jsonl", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists(), "checkpoints are removed after a finished run"
    assert (out / "model" / "model.safetensors").is_file()
    assert not list((out / "model").glob("*.bin"))

    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["happy", "meh", "sad"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.id2label == {0: "happy", 1: "meh", 2: "sad"}

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    # The invented data is separable by keyword; a working loop beats chance (33%) clearly.
    assert metrics["test"]["accuracy"] > 60.0
    assert metrics["validation"]["n"] == 30 and metrics["test"]["n"] == 30
    assert set(metrics["test"]["per_class"]) == set(labels)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 8
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evaluations = [r for r in log if "eval" in r]
    assert [r["step"] for r in evaluations] == [8 * (i + 1) for i in range(len(evaluations))]


def test_auto_epochs_scales_with_dataset_size() -> None:
    assert auto_epochs(10_000, None, 100_000, 3, 20) == 10
    assert auto_epochs(67_349, None, 100_000, 3, 20) == 3  # the floor, not ceil(100k / 67k) = 2
    assert auto_epochs(67_349, None, 100_000, 1, 20) == 2
    assert auto_epochs(300, None, 100_000, 3, 20) == 20
    assert auto_epochs(300, 4, 100_000, 3, 20) == 4


def test_early_stopping_stops_and_keeps_the_best(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    # A learning rate of ~0 cannot improve after the first evaluation, so patience 1 stops at the second.
    raw = tiny_config(
        tiny_model_dir,
        tiny_data,
        tmp_path / "run",
        epochs=6,
        learning_rate=1e-9,
        head_learning_rate=1e-9,
        early_stopping_patience=1,
        eval_every_steps=2,
    )
    result = train(validate_config(raw), show_progress=False)
    info = result.metrics["train"]
    assert info["stopped_early"] is True
    assert info["steps"] == 4 and info["best_step"] == 2


def test_keep_last_keeps_the_end_of_training_not_the_best(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    # 8 steps per epoch, 24 in all; evaluated every 5 steps, so the end of training falls between evaluations.
    runs = {}
    for keep in ("best", "last"):
        raw = tiny_config(
            tiny_model_dir, tiny_data, tmp_path / keep, eval_every_steps=5, early_stopping_patience=None, keep=keep
        )
        runs[keep] = train(validate_config(raw), show_progress=False)
    best, last = (runs[keep].metrics["train"] for keep in ("best", "last"))
    assert best["steps"] == last["steps"] == 24
    assert best["best_step"] == last["best_step"] < 24, "one trajectory, whose best is not its end"
    assert (best["kept"], best["kept_step"]) == ("best", best["best_step"])
    assert (last["kept"], last["kept_step"]) == ("last", 24)

    def evaluations(run: Path) -> list[dict]:
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        return [record for record in log if "eval" in record]

    # keep: last judges the end of training too; keep: best leaves it as it always has.
    assert [r["step"] for r in evaluations(tmp_path / "best")] == [5, 10, 15, 20]
    assert [r["step"] for r in evaluations(tmp_path / "last")] == [5, 10, 15, 20, 24]
    kept_best = load_file(tmp_path / "best" / "model" / "model.safetensors")
    kept_last = load_file(tmp_path / "last" / "model" / "model.safetensors")
    assert any(not torch.equal(kept_best[name], kept_last[name]) for name in kept_best)
    # The finished run scores the files it kept: the last evaluation's model, not the best one's.
    assert runs["last"].metrics["validation"]["accuracy"] == evaluations(tmp_path / "last")[-1]["accuracy"]
    assert runs["best"].metrics["validation"]["accuracy"] == best["best_validation_accuracy"]


def test_keep_accepts_best_or_last_only(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.keep"):
        validate_config(tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", keep="first"))


@pytest.mark.parametrize("ema_decay", [None, 0.8], ids=["live-weights", "weight-average"])
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, ema_decay: float | None
) -> None:
    # 120 training rows, batch 16: 8 steps per epoch; checkpoint every 4; the kill lands mid-epoch 2.
    configs = {}
    for name in ("straight", "killed"):
        raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / name, ema_decay=ema_decay)
        raw["model"]["hidden_dropout"] = 0.2  # dropout makes the RNG state matter
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))

    straight = run_cli(["train", str(configs["straight"]), "--no-progress"])
    assert straight.returncode == 0, straight.stderr

    killed = run_cli_killed_at(11, ["train", str(configs["killed"]), "--no-progress"])
    assert killed.returncode == -signal.SIGKILL
    # An interrupted run lives beside its target until it finishes.
    assert not (tmp_path / "killed").exists()
    partial = tmp_path / "killed.partial"
    assert (partial / "checkpoints" / "last" / "state.json").is_file()
    assert not (partial / "metrics.json").exists()
    state = json.loads((partial / "checkpoints" / "last" / "state.json").read_text())
    assert state["loop"]["step"] == 8 and state["loop"]["epoch"] == 1  # last checkpoint before the kill

    resumed = run_cli(["train", str(configs["killed"]), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert not partial.exists(), "the finished run is swapped into place"

    def files(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*"))

    assert files(tmp_path / "killed") == files(tmp_path / "straight")
    assert not (tmp_path / "killed" / "checkpoints").exists()
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert a[split] == b[split]
    assert a["train"]["steps"] == b["train"]["steps"] == 24
    wa = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log_steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == sorted(log_steps), "log lines after the checkpoint are not duplicated"


def test_resume_refuses_a_changed_config(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_cli_killed_at(5, ["train", str(path), "--no-progress"]).returncode == -signal.SIGKILL
    changed = run_cli(["train", str(path), "--resume", "--no-progress", "--set", "train.learning_rate=0.1"])
    assert changed.returncode == 2
    assert "train.learning_rate: differs from the interrupted run" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_resume_check_reads_a_key_missing_at_any_depth_as_its_default(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    # A run begun before data.augment.cjk_units existed saved data.augment without it.
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", threads=1)
    raw["data"]["augment"] = {"operations": ["swap"], "copies": 2}
    saved = validate_config(raw).model_dump(mode="json")
    del saved["data"]["augment"]["cjk_units"]
    saved_yaml = yaml.safe_dump(saved)

    check_same_config(saved_yaml, validate_config(raw), interrupted="run in x")  # the default: resumes
    ignored = {**raw, "train": {**raw["train"], "threads": 2}}
    check_same_config(saved_yaml, validate_config(ignored), interrupted="run in x")

    for key, value, expected in [
        ("cjk_units", "words", "data.augment.cjk_units: differs from the interrupted run in x (None there, 'words'"),
        ("copies", 3, "data.augment.copies: differs from the interrupted run in x (2 there, 3 now)"),
    ]:
        changed = {**raw, "data": {**raw["data"], "augment": {**raw["data"]["augment"], key: value}}}
        with pytest.raises(RunDirError) as caught:
            check_same_config(saved_yaml, validate_config(changed), interrupted="run in x")
        assert str(caught.value).startswith(expected)

    # A section the saved run did not have at all is compared whole against its default.
    without = {**raw, "data": {k: v for k, v in raw["data"].items() if k != "augment"}}
    with pytest.raises(RunDirError, match=r"^data\.augment: differs .*\(\{.*\} there, None now\)"):
        check_same_config(saved_yaml, validate_config(without), interrupted="run in x")


@pytest.mark.parametrize("accum", [1, 3])
def test_gradient_accumulation_counts_optimizer_steps(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, accum: int
) -> None:
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=1, grad_accum_steps=accum)
    result = train(validate_config(raw), show_progress=False)
    assert result.metrics["train"]["steps"] == -(-8 // accum)  # 8 batches per epoch


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_embeddings_keeps_the_word_embeddings_and_trains_the_rest(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, freeze: bool
) -> None:
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=1, early_stopping_patience=None)
    raw["finetune"] = {"freeze_embeddings": freeze}
    result = train(validate_config(raw), show_progress=False)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    tuned = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    words_kept = torch.equal(base.get_input_embeddings().weight, tuned.get_input_embeddings().weight)
    assert words_kept is freeze
    # Everything else learns either way: the position embeddings and the first layer's query.
    assert not torch.equal(
        base.base_model.embeddings.position_embeddings.weight, tuned.base_model.embeddings.position_embeddings.weight
    )
    assert not torch.equal(
        base.base_model.encoder.layer[0].attention.self.query.weight,
        tuned.base_model.encoder.layer[0].attention.self.query.weight,
    )
    vocabulary = base.get_input_embeddings().weight.numel()
    trainable, total = result.metrics["train"]["trainable_parameters"], result.metrics["train"]["total_parameters"]
    assert total - trainable == (vocabulary if freeze else 0)


def test_freeze_layers_keeps_the_embeddings_and_the_lowest_blocks(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=1, early_stopping_patience=None)
    raw["finetune"] = {"freeze_embeddings": False, "freeze_layers": 1}
    result = train(validate_config(raw), show_progress=False)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    tuned = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    kept = {name for name, value in tuned_params.items() if torch.equal(value, base_params[name])}
    assert kept == {name for name in tuned_params if "embeddings" in name or ".layer.0." in name}
    trainable, total = result.metrics["train"]["trainable_parameters"], result.metrics["train"]["total_parameters"]
    assert total - trainable == sum(base_params[name].numel() for name in kept)


def test_freeze_layers_must_leave_a_block_to_train(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=1)
    raw["finetune"] = {"freeze_embeddings": False, "freeze_layers": 2}
    with pytest.raises(ConfigError, match=r"finetune\.freeze_layers: 2 would freeze every block.*at most 1"):
        train(validate_config(raw), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_weight_average_is_what_is_kept_and_leaves_training_alone(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    # One epoch, one evaluation at its end: without an average the kept model is the last live weights.
    runs = {}
    for name, decay in (("live", None), ("average", 0.9)):
        raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / name, epochs=1, ema_decay=decay)
        runs[name] = train(validate_config(raw), show_progress=False).run_dir

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]

    def weights(run: Path) -> dict[str, torch.Tensor]:
        return load_file(run / "model" / "model.safetensors")

    assert losses(runs["live"]) == losses(runs["average"]), "the average must not change what training sees"
    live, average = weights(runs["live"]), weights(runs["average"])
    assert live.keys() == average.keys()
    differing = {name for name in live if not torch.equal(live[name], average[name])}
    assert "classifier.weight" in differing and any(".layer.1." in name for name in differing)
