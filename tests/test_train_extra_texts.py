"""Inline augmentation (data.augment) and distillation on transfer data (distill.transfer_data), on the tiny BERT."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from tests.conftest import make_rows, tiny_config, write_csv
from tests.fault_injection import run_cli, run_cli_killed_at
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError, DataError, TuneforgeError
from tuneforge.rundir import RunDir
from tuneforge.train.distill import NO_LABEL, TeacherLogitsCache, distillation_loss, teacher_targets
from tuneforge.train.extra_texts import AUGMENTED_FILE, TRANSFER_FILE
from tuneforge.train.loop import train


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_augmented_copies_of_the_training_split_join_training_and_the_audit(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    plain = train(
        validate_config(tiny_config(tiny_model_dir, tiny_data, tmp_path / "plain", epochs=1)), show_progress=False
    )
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "aug", epochs=1)
    raw["data"]["augment"] = {"operations": ["swap", "delete"], "copies": 2, "rate": 0.3}
    result = train(validate_config(raw), show_progress=False)

    counts = result.metrics["train"]
    audit = json.loads(RunDir(result.run_dir).audit_file.read_text())["augmentation"]
    assert counts["labelled_examples"] == plain.metrics["train"]["examples"] == audit["originals"]
    assert counts["augmented_examples"] == audit["augmented"] > counts["labelled_examples"]
    assert counts["examples"] == counts["labelled_examples"] + counts["augmented_examples"]
    assert set(audit["operations"]) == {"swap", "delete"}
    for tally in audit["operations"].values():
        assert tally["generated"] == 2 * counts["labelled_examples"]
        assert tally["kept"] + sum(tally["dropped"].values()) == tally["generated"]
    # Only the training split is augmented: validation and test are the plain run's, scored alike in number.
    assert result.metrics["validation"]["n"] == plain.metrics["validation"]["n"]
    assert result.metrics["test"]["n"] == plain.metrics["test"]["n"]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(_weights(plain.run_dir).values(), _weights(result.run_dir).values(), strict=True)
    )
    assert not (result.run_dir / "checkpoints").exists(), "the kept copies go with the checkpoint"


def test_a_run_with_augmentation_killed_mid_training_resumes_with_the_kept_copies(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    configs = {}
    for name in ("straight", "killed"):
        raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / name, epochs=2)
        raw["data"]["augment"] = {"operations": ["swap", "typo"], "copies": 1}
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))
    assert run_cli(["train", str(configs["straight"]), "--no-progress"]).returncode == 0
    killed = run_cli_killed_at(9, ["train", str(configs["killed"]), "--no-progress"])
    assert killed.returncode == -signal.SIGKILL
    kept = tmp_path / "killed.partial" / AUGMENTED_FILE
    assert kept.is_file()
    made = json.loads(kept.read_text())

    resumed = run_cli(["train", str(configs["killed"]), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "kept from the interrupted run" in " ".join(resumed.stderr.split())
    assert made["texts"] and len(made["texts"]) == len(made["labels"])
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kept_copies_are_not_reused_for_other_options(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    from tuneforge.data import prepare_data
    from tuneforge.train.extra_texts import augmented_copies, save_augmented

    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=1)
    raw["data"]["augment"] = {"operations": ["swap"]}
    config = validate_config(raw)
    data = prepare_data(config.data, seed=config.train.seed)
    made = augmented_copies(config, data, tmp_path, resume=True)
    assert made is not None and "reused" not in made.report
    save_augmented(tmp_path, made)
    again = augmented_copies(config, data, tmp_path, resume=True)
    assert again is not None and again.report["reused"] and again.texts == made.texts
    raw["data"]["augment"]["rate"] = 0.5
    other = augmented_copies(validate_config(raw), data, tmp_path, resume=True)
    assert other is not None and "reused" not in other.report


# --- distillation on transfer data ---------------------------------------------------------------


def test_distillation_loss_counts_an_unlabelled_example_by_its_kl_term_alone() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, NO_LABEL, 1])
    t, alpha = 2.0, 0.3
    log_s, log_t = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * t**2
    ce = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    expected = torch.stack(
        [
            alpha * kl[0] + (1 - alpha) * ce[0],
            alpha * kl[1] + (1 - alpha) * ce[1],
            kl[2],
            alpha * kl[3] + (1 - alpha) * ce[3],
        ]
    ).mean()
    got = distillation_loss(student, teacher, labels, temperature=t, alpha=alpha)
    assert torch.allclose(got, expected, atol=1e-6)
    # With every example labelled it is the usual batch-mean KL plus mean cross-entropy.
    labelled = torch.tensor([0, 2, 1, 1])
    usual = alpha * t**2 * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) + (
        1 - alpha
    ) * F.cross_entropy(student, labelled)
    assert torch.allclose(distillation_loss(student, teacher, labelled, temperature=t, alpha=alpha), usual, atol=1e-6)
    # alpha = 0 ignores the teacher for labelled rows, but an unlabelled row still learns from it.
    only_labels = distillation_loss(student, teacher, labels, temperature=t, alpha=0.0)
    assert torch.allclose(only_labels, torch.stack([ce[0], ce[1], kl[2], ce[3]]).mean(), atol=1e-6)


@pytest.fixture()
def teacher_run(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> Path:
    return train(
        validate_config(tiny_config(tiny_model_dir, tiny_data, tmp_path / "teacher", epochs=2)), show_progress=False
    ).run_dir


def _transfer_config(
    model: Path, data: dict, out: Path, teacher: Path, transfer: dict, **train_options: object
) -> dict:
    raw = tiny_config(model, data, out, **({"epochs": 1} | train_options))
    raw["distill"] = {"teacher": str(teacher), "alpha": 0.5, "transfer_data": transfer}
    return raw


def test_transfer_texts_are_labelled_by_the_teacher_and_never_include_a_test_text(
    tiny_model_dir: Path, tiny_data: dict, teacher_run: Path, tmp_path: Path
) -> None:
    test_texts = [text for text, _ in make_rows(30, seed=2)]
    unlabelled = [text for text, _ in make_rows(60, seed=5)] + test_texts[:7]
    (tmp_path / "unlabelled.txt").write_text("\n".join(unlabelled) + "\n", encoding="utf-8")
    transfer = {"file": str(tmp_path / "unlabelled.txt"), "augment": {"operations": ["swap"], "copies": 1}}
    raw = _transfer_config(tiny_model_dir, tiny_data, tmp_path / "student", teacher_run, transfer)
    result = train(validate_config(raw), show_progress=False)

    audit = json.loads(RunDir(result.run_dir).audit_file.read_text())["transfer_data"]
    assert audit["from_file"] == 67
    assert audit["dropped"]["in_validation_or_test"] >= 7
    counts = result.metrics["train"]
    assert counts["transfer_examples"] == audit["texts"] > 60
    assert counts["examples"] == counts["labelled_examples"] + counts["transfer_examples"]

    plain = train(
        validate_config(
            {
                **tiny_config(tiny_model_dir, tiny_data, tmp_path / "plain", epochs=1),
                "distill": {"teacher": str(teacher_run)},
            }
        ),
        show_progress=False,
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(_weights(plain.run_dir).values(), _weights(result.run_dir).values(), strict=True)
    )


def test_max_texts_samples_the_transfer_data_with_the_seed(
    tiny_model_dir: Path, tiny_data: dict, teacher_run: Path, tmp_path: Path
) -> None:
    from tuneforge.data import prepare_data
    from tuneforge.train.extra_texts import transfer_texts

    (tmp_path / "u.txt").write_text("\n".join(t for t, _ in make_rows(80, seed=7)), encoding="utf-8")
    raw = _transfer_config(
        tiny_model_dir, tiny_data, tmp_path / "s", teacher_run, {"file": str(tmp_path / "u.txt"), "max_texts": 25}
    )
    config = validate_config(raw)
    data = prepare_data(config.data, seed=config.train.seed)
    first = transfer_texts(config, data, tmp_path, resume=False)
    second = transfer_texts(config, data, tmp_path, resume=False)
    assert first is not None and second is not None
    assert len(first.texts) == 25 and first.texts == second.texts and first.report["sampled_out"] == 55


def test_resumed_transfer_distillation_reuses_the_kept_texts_and_logits(
    tiny_model_dir: Path, tiny_data: dict, teacher_run: Path, tmp_path: Path
) -> None:
    (tmp_path / "u.txt").write_text("\n".join(t for t, _ in make_rows(60, seed=9)), encoding="utf-8")
    transfer = {"file": str(tmp_path / "u.txt"), "augment": {"operations": ["delete"]}}
    configs = {}
    for name in ("straight", "killed"):
        raw = _transfer_config(tiny_model_dir, tiny_data, tmp_path / name, teacher_run, transfer, epochs=2)
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))
    assert run_cli(["train", str(configs["straight"]), "--no-progress"]).returncode == 0
    killed = run_cli_killed_at(10, ["train", str(configs["killed"]), "--no-progress"])
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed.partial" / TRANSFER_FILE).is_file()

    import shutil

    shutil.rmtree(teacher_run / "model")  # the resumed run can only use what it kept
    resumed = run_cli(["train", str(configs["killed"]), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    said = " ".join(resumed.stderr.split())
    assert "reusing the teacher's logits" in said and "sampled out) (kept from the interrupted run)" in said
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_transfer_and_augmentation_input_names_the_key(
    tiny_model_dir: Path, tiny_data: dict, teacher_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="transfer_data: needs a teacher"):
        validate_config(
            {**tiny_config(tiny_model_dir, tiny_data, tmp_path / "x"), "distill": {"transfer_data": {"file": "u.txt"}}}
        )
    with pytest.raises(ConfigError, match="give file"):
        validate_config(
            {**tiny_config(tiny_model_dir, tiny_data, tmp_path / "x"), "distill": {"teacher": "t", "transfer_data": {}}}
        )
    labelled = write_csv(tmp_path / "labelled.csv", make_rows(20, seed=3))
    raw = _transfer_config(tiny_model_dir, tiny_data, tmp_path / "a", teacher_run, {"file": str(labelled)})
    with pytest.raises(DataError, match=r"distill\.transfer_data\.file: .*has a label column 'label'"):
        train(validate_config(raw), show_progress=False)
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    raw = _transfer_config(
        tiny_model_dir, tiny_data, tmp_path / "b", teacher_run, {"file": str(tmp_path / "empty.txt")}
    )
    with pytest.raises(DataError, match=r"distill\.transfer_data\.file: .*holds no texts"):
        train(validate_config(raw), show_progress=False)

    other = write_csv(
        tmp_path / "other.csv", [(t, "x" if i % 2 else "y") for i, (t, _) in enumerate(make_rows(40, seed=4))]
    )
    other_run = train(
        validate_config(tiny_config(tiny_model_dir, {"train": other}, tmp_path / "other", epochs=1)),
        show_progress=False,
    )
    raw = tiny_config(tiny_model_dir, tiny_data, tmp_path / "c", epochs=1)
    raw["data"]["augment"] = {"operations": ["swap"], "filter_run": str(other_run.run_dir)}
    with pytest.raises(TuneforgeError, match=r"data\.augment: filter run .*does not know the data's label"):
        train(validate_config(raw), show_progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists(), "bad input leaves nothing behind"


def _count_teacher_scoring(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets the number of texts of each call of the teacher (which still answers as before)."""
    import tuneforge.train.distill as distill_module

    scored: list[int] = []
    real_predict = distill_module.predict_logits
    monkeypatch.setattr(
        distill_module,
        "predict_logits",
        lambda model, encoded, **kw: scored.append(len(encoded)) or real_predict(model, encoded, **kw),
    )
    return scored


def test_the_teachers_logits_are_cached_per_text_across_runs(
    teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneforge.config import DistillConfig

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    cfg = DistillConfig(teacher=teacher_run)
    labels = RunDir(teacher_run).labels()
    first_texts = [text for text, _ in make_rows(20, seed=11)]
    first = teacher_targets(cfg, first_texts, labels)

    scored = _count_teacher_scoring(monkeypatch)
    new_texts = [text for text, _ in make_rows(5, seed=12) if text not in first_texts]
    again = teacher_targets(cfg, [*reversed(first_texts), *new_texts], labels)
    assert scored == [len(new_texts)], "only the texts the teacher has not seen are scored"
    assert torch.allclose(again[: len(first_texts)], first.flip(0))
    assert torch.allclose(again[len(first_texts) :], teacher_targets(cfg, new_texts, labels))

    # Only the needed rows are filled (alpha 0 reads no teacher logits for labelled rows).
    partial = teacher_targets(cfg, first_texts, labels, needed=[3, 4])
    assert torch.equal(partial[[3, 4]], first[[3, 4]]) and not partial[:3].any() and not partial[5:].any()

    # A retrained teacher (other weights) never gets its predecessor's logits; a damaged cache is ignored.
    cache = TeacherLogitsCache.for_teacher(RunDir(teacher_run), 32)
    assert len(cache) == len(first_texts) + len(new_texts) and cache.path.is_file()
    weights = teacher_run / "model" / "model.safetensors"
    tensors = load_file(weights)
    first_key = next(iter(tensors))
    tensors[first_key] = tensors[first_key] + 1.0
    from safetensors.torch import save_file

    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert TeacherLogitsCache.for_teacher(RunDir(teacher_run), 32).path != cache.path
    cache.path.write_bytes(b"not safetensors")
    assert len(TeacherLogitsCache(cache.path, len(labels))) == 0


def test_alpha_zero_transfer_distillation_scores_only_the_transfer_texts(
    tiny_model_dir: Path, tiny_data: dict, teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    scored = _count_teacher_scoring(monkeypatch)
    (tmp_path / "u.txt").write_text("\n".join(t for t, _ in make_rows(40, seed=13)), encoding="utf-8")
    raw = _transfer_config(tiny_model_dir, tiny_data, tmp_path / "s", teacher_run, {"file": str(tmp_path / "u.txt")})
    raw["distill"]["alpha"] = 0.0
    result = train(validate_config(raw), show_progress=False)
    counts = result.metrics["train"]
    assert sum(scored) == counts["transfer_examples"] > 0
    assert counts["examples"] == counts["labelled_examples"] + counts["transfer_examples"]
