"""Self-training on unlabelled texts: the pseudo-label selection, the rounds end to end, resume, bad input."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rich.console import Console

from tests.conftest import make_rows, tiny_config, write_csv
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError, DataError, ModelError, RunDirError
from tuneforge.infer.predictor import Predictor
from tuneforge.train import loop
from tuneforge.train.checkpoint import LoopState, has_checkpoint
from tuneforge.train.self_training import (
    second_view_labels,
    select_proportional,
    select_pseudo_labels,
    self_train,
    work_dir,
)

LABELS = ["x", "y", "z"]


# --------------------------------------------------------------------------- selection (a pure function)


def test_selection_keeps_confident_texts_balanced_to_the_median_label() -> None:
    texts = [f"t{i}" for i in range(9)]
    probabilities = [
        [0.95, 0.03, 0.02],  # x
        [0.91, 0.05, 0.04],  # x
        [0.97, 0.02, 0.01],  # x
        [0.91, 0.05, 0.04],  # x, ties t1: text order decides
        [0.80, 0.10, 0.10],  # below the threshold
        [0.02, 0.93, 0.05],  # y: the scarcest label, one text
        [0.40, 0.30, 0.30],  # not confident
        [0.90, 0.05, 0.05],  # x, exactly at the threshold: kept if the cap allows
        [0.05, 0.05, 0.90],  # z
    ]
    chosen = select_pseudo_labels(texts, probabilities, LABELS, threshold=0.9, balance_ratio=3.0)

    assert chosen.confident == {"x": 5, "y": 1, "z": 1}
    assert chosen.cap == 3  # 3.0 x the median label's 1
    # The most confident x texts first, the tie t1/t3 broken by text order; t7 loses to the cap.
    assert list(zip(chosen.texts, chosen.labels, strict=True)) == [
        ("t2", "x"),
        ("t0", "x"),
        ("t1", "x"),
        ("t5", "y"),
        ("t8", "z"),
    ]
    assert chosen.per_label(LABELS) == {"x": 3, "y": 1, "z": 1}
    again = select_pseudo_labels(texts, probabilities, LABELS, threshold=0.9, balance_ratio=3.0)
    assert again == chosen


def test_one_scarce_label_does_not_cap_the_others_to_a_handful() -> None:
    # x: 6 confident texts, y: 1, z: 2. The median label has 2, so the cap is 1.5 x 2 = 3 (the scarcest
    # label's count would have allowed 1 text per label).
    probabilities = [[0.9, 0.05, 0.05]] * 6 + [[0.05, 0.9, 0.05]] + [[0.05, 0.05, 0.9]] * 2
    chosen = select_pseudo_labels([f"t{i}" for i in range(9)], probabilities, LABELS, threshold=0.8, balance_ratio=1.5)
    assert chosen.cap == 3
    assert chosen.per_label(LABELS) == {"x": 3, "y": 1, "z": 2}


def test_selection_honours_max_per_label_and_skips_labelled_texts() -> None:
    texts = ["Good film", "good  FILM", "great plot", "fine acting", "dull story"]
    probabilities = [[0.99, 0.01, 0.0], [0.99, 0.01, 0.0], [0.98, 0.02, 0.0], [0.97, 0.03, 0.0], [0.1, 0.0, 0.9]]
    chosen = select_pseudo_labels(
        texts, probabilities, LABELS, threshold=0.5, max_per_label=1, exclude=["good film", "unrelated"]
    )
    # Both spellings of a labelled text are skipped (normalised matching); the cap keeps one x text.
    assert chosen.excluded == 2
    assert chosen.texts == ["great plot", "dull story"]
    assert chosen.labels == ["x", "z"]
    assert chosen.probabilities == [0.98, 0.9]
    assert chosen.confident == {"x": 2, "y": 0, "z": 1}


def test_selection_with_no_confident_text_selects_nothing() -> None:
    chosen = select_pseudo_labels(["a", "b"], [[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]], LABELS, threshold=0.6)
    assert chosen.texts == [] and chosen.cap == 0
    with pytest.raises(ValueError, match="2 texts but 1"):
        select_pseudo_labels(["a", "b"], [[0.5, 0.3, 0.2]], LABELS, threshold=0.6)


def test_proportional_selection_ranks_each_label_by_its_own_probability() -> None:
    # An unsure binary model that leans to "neg": every text's most probable label is neg, so a shared
    # threshold would label only negatives. Ranked by its own probability, pos still gets its likeliest texts.
    texts = [f"t{i}" for i in range(8)]
    p_pos = [0.30, 0.45, 0.20, 0.48, 0.10, 0.40, 0.35, 0.05]
    probabilities = [[1 - p, p] for p in p_pos]
    chosen = select_proportional(texts, probabilities, ["neg", "pos"], fraction=0.5, shares=[1, 1])
    assert chosen.quota == {"neg": 2, "pos": 2}
    assert list(zip(chosen.texts, chosen.labels, strict=True)) == [
        ("t7", "neg"),
        ("t4", "neg"),
        ("t3", "pos"),
        ("t1", "pos"),
    ]
    assert chosen.probabilities == [0.95, 0.90, 0.48, 0.45]
    assert select_proportional(texts, probabilities, ["neg", "pos"], fraction=0.5, shares=[1, 1]) == chosen

    # Shared out as the model predicts (here: all neg), pos asks for nothing; shares [3, 1] split 4 texts 3:1.
    predicted = select_proportional(texts, probabilities, ["neg", "pos"], fraction=0.5)
    assert predicted.quota == {"neg": 4, "pos": 0} and predicted.labels == ["neg"] * 4
    assert select_proportional(texts, probabilities, ["neg", "pos"], fraction=0.5, shares=[3, 1]).quota == {
        "neg": 3,
        "pos": 1,
    }


def test_proportional_selection_gives_a_contested_text_to_its_likelier_label() -> None:
    texts = ["a", "b", "c", "d", "e", "f"]
    probabilities = [
        [0.50, 0.45, 0.05],  # x's and y's likeliest text: it goes to x, and y is not given another
        [0.90, 0.05, 0.05],  # labelled data already
        [0.10, 0.20, 0.70],
        [0.20, 0.30, 0.50],
        [0.40, 0.30, 0.30],
        [0.30, 0.40, 0.30],
    ]
    chosen = select_proportional(texts, probabilities, LABELS, fraction=0.4, shares=[1, 1, 1], exclude=["B"])
    # 5 texts remain, 2 are asked for: one each for the first two labels (equal remainders go first-come).
    assert chosen.excluded == 1
    assert chosen.quota == {"x": 1, "y": 1, "z": 0}
    assert list(zip(chosen.texts, chosen.labels, strict=True)) == [("a", "x")]
    # Quotas always add up to the total, however the shares divide it.
    everything = select_proportional(texts, probabilities, LABELS, fraction=1.0, shares=[2, 2, 3])
    assert everything.quota == {"x": 2, "y": 2, "z": 2} and sum(everything.quota.values()) == 6
    with pytest.raises(ValueError, match="2 shares for 3 labels"):
        select_proportional(texts, probabilities, LABELS, fraction=0.5, shares=[1, 1])


# --------------------------------------------------------------------------- end to end


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_second_view_labels_by_nearest_text_and_by_nearest_centroid() -> None:
    # a's texts at 0 and 70 degrees (centroid 35), b's at 55: a text at 42 is nearest b's text but a's centroid.
    labelled = np.array([_unit(0), _unit(70), _unit(55)])
    names = ["a", "a", "b"]
    unlabelled = np.array([_unit(42), _unit(5), _unit(60)])
    assert second_view_labels(unlabelled, labelled, names, method="neighbour") == ["b", "a", "b"]
    assert second_view_labels(unlabelled, labelled, names, method="centroid") == ["a", "a", "b"]
    with pytest.raises(ValueError, match="3 labelled embeddings for 2 labels"):
        second_view_labels(unlabelled, labelled, names[:2], method="neighbour")
    with pytest.raises(ValueError, match="neighbour or centroid"):
        second_view_labels(unlabelled, labelled, names, method="knn")


def _st_config(
    tiny_model_dir: Path, tmp_path: Path, *, epochs: int, rounds: int, threshold: float | None, **semi: Any
) -> dict:
    data = {
        "train": write_csv(tmp_path / "train.csv", make_rows(150, seed=1)),
        "test": write_csv(tmp_path / "test.csv", make_rows(30, seed=2)),
    }
    unlabelled = tmp_path / "unlabelled.txt"
    # A few unlabelled texts are labelled training texts already: those must never be pseudo-labelled.
    labelled_copies = [text for text, _ in make_rows(150, seed=1)[:5]]
    unlabelled.write_text("\n".join([*(t for t, _ in make_rows(90, seed=5)), *labelled_copies]) + "\n")
    raw = tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=epochs, early_stopping_patience=None)
    raw["data"]["unlabeled"] = str(unlabelled)
    raw["train"]["semi_supervised"] = {
        "rounds": rounds,
        **({} if threshold is None else {"threshold": threshold}),
        **semi,
    }
    return raw


class _Recorder:
    """Wraps loop.train: records each round's config and the split files it reads at that moment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_round: int | None = None, fail_at_step: int = 0):
        self.calls: list[dict[str, Any]] = []
        self.real = loop.train
        self.fail_round, self.fail_at_step = fail_round, fail_at_step
        monkeypatch.setattr(loop, "train", self)

    def __call__(self, config: Any, **kwargs: Any) -> loop.TrainResult:
        round_name = Path(config.output.dir).name
        self.calls.append(
            {
                "round": round_name,
                "resume": kwargs.get("resume", False),
                "train": Path(config.data.train).read_text(encoding="utf-8"),
                "validation": Path(config.data.validation).read_text(encoding="utf-8"),
                "test": Path(config.data.test).read_text(encoding="utf-8"),
                "config": config,
            }
        )
        if self.fail_round is not None and round_name == f"round-{self.fail_round}":
            self.fail_round = None  # once

            def fail(state: LoopState) -> None:
                if state.step == self.fail_at_step:
                    raise KeyboardInterrupt  # what Ctrl-C does mid-training

            kwargs["on_step"] = fail
        return self.real(config, **kwargs)


def test_self_training_publishes_the_best_round_with_its_record(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _st_config(tiny_model_dir, tmp_path, epochs=20, rounds=2, threshold=0.6, publish="best")
    recorder = _Recorder(monkeypatch)
    out = io.StringIO()
    result = self_train(validate_config(raw), show_progress=False, console=Console(file=out, width=200))
    target = tmp_path / "run"

    report = json.loads((target / "self_training.json").read_text())
    rounds = report["rounds"]
    assert [r["index"] for r in rounds] == list(range(len(rounds)))
    assert len(rounds) >= 2, report["stopped_early"]
    assert rounds[0]["pseudo_labelled"] == 0 and rounds[0]["train_examples"] == 120
    first = rounds[1]
    assert first["pseudo_labelled"] > 0 and first["threshold"] == 0.6
    assert sum(first["pseudo_labelled_per_label"].values()) == first["pseudo_labelled"]
    assert first["train_examples"] == 120 + first["pseudo_labelled"]
    assert first["skipped_as_labelled"] == 5
    assert first["labelled_by"] == str((tmp_path / "run.rounds" / "round-0").absolute())
    # The best on validation is published, ties going to the later round.
    scores = [r["validation"]["accuracy"] for r in rounds]
    best = max(range(len(rounds)), key=lambda i: (scores[i], i))
    assert report["published_round"] == best
    assert result.run_dir == target
    assert result.metrics["validation"]["accuracy"] == scores[best]
    # Round 0 adds no pseudo labels, so only a later round brings its pseudo_labels.csv along.
    assert (target / "pseudo_labels.csv").is_file() == (best > 0)
    assert "published round" in out.getvalue()

    # Every round validated and tested on the same split files; pseudo labels only reach training.
    assert [c["round"] for c in recorder.calls] == [f"round-{i}" for i in range(len(rounds))]
    assert len({c["validation"] for c in recorder.calls}) == 1
    assert len({c["test"] for c in recorder.calls}) == 1
    labelled_rows = recorder.calls[0]["train"]
    assert all(c["train"].startswith(labelled_rows) for c in recorder.calls[1:])
    validation_texts = {line.rsplit(",", 1)[0] for line in recorder.calls[0]["validation"].splitlines()[1:]}
    for call in recorder.calls[1:]:
        added = call["train"][len(labelled_rows) :].splitlines()
        assert not {line.rsplit(",", 1)[0] for line in added} & validation_texts
    assert all(c["config"].train.semi_supervised is None and c["config"].data.unlabeled is None for c in recorder.calls)

    # output.dir is an ordinary run that records how it was made; the work folder is gone.
    saved = yaml.safe_load((target / "config.yaml").read_text())
    assert saved["train"]["semi_supervised"]["rounds"] == 2
    assert saved["data"]["unlabeled"] == str((tmp_path / "unlabelled.txt").absolute())
    predictions = Predictor(target, open_set=False).predict(["a great and lovely film"])
    assert predictions[0].label in {"happy", "meh", "sad"}
    assert not work_dir(target).exists()

    # A second run refuses the finished one unless told to overwrite it.
    with pytest.raises(RunDirError, match=r"output.dir: .* already exists; pass --overwrite"):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))


def test_proportional_self_training_labels_a_growing_share_each_round(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # label_smoothing 0.5 caps what the model says below any useful threshold: proportional needs none.
    raw = _st_config(
        tiny_model_dir, tmp_path, epochs=2, rounds=2, threshold=None, selection="proportional", fraction=0.3
    )
    raw["train"]["label_smoothing"] = 0.5
    raw["train"]["semi_supervised"]["proportions"] = "labelled"
    recorder = _Recorder(monkeypatch)
    self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))

    report = json.loads((tmp_path / "run" / "self_training.json").read_text())
    assert [r["index"] for r in report["rounds"]] == [0, 1, 2], report["stopped_early"]
    labelled_rows = recorder.calls[0]["train"].splitlines()[1:]
    shares = [sum(line.endswith("," + name) for line in labelled_rows) for name in ["happy", "sad", "meh"]]
    # 95 unlabelled texts, 5 of them labelled already: round 1 asks for 0.3 x 90 = 27, round 2 for 54,
    # shared out like the labelled training split.
    for record, total in zip(report["rounds"][1:], (27, 54), strict=True):
        quota = record["quota_per_label"]
        assert sum(quota.values()) == total
        for name, n in zip(["happy", "sad", "meh"], shares, strict=True):
            assert abs(quota[name] - total * n / sum(shares)) < 1
        assert all(record["pseudo_labelled_per_label"][name] <= quota[name] for name in quota)
        assert record["pseudo_labelled"] > total * 0.5  # contested texts aside, the quotas are filled
        assert record["threshold"] is None and record["skipped_as_labelled"] == 5
        assert record["train_examples"] == len(labelled_rows) + record["pseudo_labelled"]
    assert report["settings"]["selection"] == "proportional"
    # The published round's pseudo labels are kept beside its model: the rows it was trained on beyond the
    # labelled ones, with the probability the round-1 model gave each label.
    with (tmp_path / "run" / "pseudo_labels.csv").open(encoding="utf-8", newline="") as handle:
        kept = list(csv.DictReader(handle))
    assert len(kept) == report["rounds"][2]["pseudo_labelled"]
    added = list(csv.reader(io.StringIO(recorder.calls[2]["train"])))[1 + len(labelled_rows) :]
    assert [[row["text"], row["label"]] for row in kept] == added
    assert all(0 < float(row["probability"]) <= 1 for row in kept)


def test_agreement_keeps_only_pseudo_labels_the_pretrained_embeddings_agree_with(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneforge.models.loading import sentence_embeddings

    raw = _st_config(tiny_model_dir, tmp_path, epochs=20, rounds=1, threshold=0.6, agreement="neighbour")
    recorder = _Recorder(monkeypatch)
    out = io.StringIO()
    config = validate_config(raw)
    self_train(config, show_progress=False, console=Console(file=out, width=200))

    record = json.loads((tmp_path / "run" / "self_training.json").read_text())["rounds"][1]
    assert 0 < record["left_out_by_agreement"] < 95
    assert record["pseudo_labelled"] > 0
    assert f"disagrees with round-0 on {record['left_out_by_agreement']} of 95 unlabelled texts" in out.getvalue()
    labelled = list(csv.reader(io.StringIO(recorder.calls[0]["train"])))[1:]
    added = list(csv.reader(io.StringIO(recorder.calls[1]["train"])))[1 + len(labelled) :]
    assert len(added) == record["pseudo_labelled"]
    # Every pseudo label is the one the nearest labelled training text has in the pretrained model's space.
    rows = sentence_embeddings(config.model, [t for t, _ in labelled] + [t for t, _ in added])
    view = second_view_labels(
        rows[len(labelled) :], rows[: len(labelled)], [y for _, y in labelled], method="neighbour"
    )
    assert view == [y for _, y in added]


def test_resume_keeps_finished_rounds_and_continues_the_interrupted_one(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 epochs of a random tiny model are barely confident: a threshold just above chance selects texts.
    raw = _st_config(tiny_model_dir, tmp_path, epochs=3, rounds=1, threshold=0.34)
    target, work = tmp_path / "run", tmp_path / "run.rounds"
    recorder = _Recorder(monkeypatch, fail_round=1, fail_at_step=5)
    with pytest.raises(KeyboardInterrupt):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))
    assert (work / "round-0" / "metrics.json").is_file()
    assert has_checkpoint(work / "round-1.partial" / "checkpoints" / "last")
    assert not target.exists()
    kept = {p: p.stat().st_mtime_ns for p in (work / "round-0").rglob("*") if p.is_file()}
    pseudo_file = work / "round-1-pseudo.json"
    pseudo_mtime = pseudo_file.stat().st_mtime_ns

    # Without --resume or --overwrite, the interrupted rounds are not silently replaced.
    with pytest.raises(RunDirError, match="pass --resume to continue it or --overwrite"):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))

    # A self-training begun before a nested key existed resumes with that key at its default (its saved
    # config lacks it); a nested key that did change is named in full.
    saved_config = work / "config.yaml"
    saved = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
    del saved["train"]["semi_supervised"]["selection"]
    saved_config.write_text(yaml.safe_dump(saved), encoding="utf-8")
    changed = copy.deepcopy(raw)
    changed["train"]["semi_supervised"]["threshold"] = 0.5
    with pytest.raises(RunDirError, match=r"^train\.semi_supervised\.threshold: differs from the interrupted self"):
        self_train(validate_config(changed), resume=True, show_progress=False, console=Console(file=io.StringIO()))

    recorder.calls.clear()
    seen: dict[Path, int] = {}
    real = recorder.real

    def check_round_0_untouched(config: Any, **kwargs: Any) -> loop.TrainResult:
        seen.update({p: p.stat().st_mtime_ns for p in [*kept, pseudo_file]})
        return real(config, **kwargs)

    recorder.real = check_round_0_untouched
    out = io.StringIO()
    result = self_train(validate_config(raw), resume=True, show_progress=False, console=Console(file=out, width=200))

    # Round 0 was kept, not trained again; round 1 resumed from its checkpoint with the same pseudo labels.
    assert [(c["round"], c["resume"]) for c in recorder.calls] == [("round-1", True)]
    assert seen == {**kept, pseudo_file: pseudo_mtime}
    assert "reusing the pseudo labels" in out.getvalue()
    assert "resuming" in out.getvalue()
    report = json.loads((target / "self_training.json").read_text())
    assert [r["index"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["pseudo_labelled"] > 0
    assert result.metrics["train"]["examples"] == report["rounds"][report["published_round"]]["train_examples"]
    assert report["published_round"] == 1 and report["chosen_by"] == "the last round"  # publish: last, the default
    assert not work.exists()


def test_resume_with_nothing_to_resume_and_overwrite_of_a_foreign_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.9)
    with pytest.raises(RunDirError, match="no interrupted self-training"):
        self_train(validate_config(raw), resume=True, show_progress=False, console=Console(file=io.StringIO()))
    foreign = tmp_path / "run.rounds"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a tuneforge self-training folder"):
        self_train(validate_config(raw), overwrite=True, show_progress=False, console=Console(file=io.StringIO()))
    assert (foreign / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- bad input


def test_a_threshold_the_smoothed_model_cannot_reach_is_refused_before_any_work(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Label smoothing 0.1 over 3 labels teaches the model to say at most 0.933.
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.93)
    with pytest.raises(ConfigError, match=r"train.semi_supervised.threshold: 0.93 is at or above .*0.933"):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run.rounds").exists()
    raw["train"]["label_smoothing"] = 0.0
    with pytest.raises(RunDirError, match="no interrupted"):  # accepted: it gets as far as the resume check
        self_train(validate_config(raw), resume=True, show_progress=False, console=Console(file=io.StringIO()))


def test_a_setting_the_selection_does_not_use_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.8, selection="proportional")
    with pytest.raises(ConfigError, match=r"train.semi_supervised.*threshold: not used by selection proportional"):
        validate_config(raw)
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=None, fraction=0.2)
    with pytest.raises(ConfigError, match=r"train.semi_supervised.*fraction: not used by selection threshold"):
        validate_config(raw)
    # A saved config holds every key with its default: it loads again.
    raw["train"]["semi_supervised"].update(selection="proportional")
    saved = validate_config(raw).model_dump(mode="json")
    assert validate_config(saved).train.semi_supervised.fraction == 0.2


def test_semi_supervised_and_unlabelled_data_go_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.9)
    without_file = json.loads(json.dumps(raw))
    without_file["data"]["unlabeled"] = None
    with pytest.raises(ConfigError, match=r"train.semi_supervised: needs data.unlabeled"):
        validate_config(without_file)
    without_method = json.loads(json.dumps(raw))
    without_method["train"]["semi_supervised"] = None
    with pytest.raises(ConfigError, match=r"data.unlabeled: set train.semi_supervised"):
        validate_config(without_method)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("\n  \n", r"data.unlabeled: .*holds no texts"),
        ("text,label\ngreat film,happy\n", r"data.unlabeled: .*has a label column 'label'"),
    ],
)
def test_bad_unlabelled_file_fails_before_anything_is_written(
    tiny_model_dir: Path, tmp_path: Path, content: str, message: str
) -> None:
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.9)
    bad = tmp_path / ("unlabelled.csv" if "," in content else "unlabelled.txt")
    bad.write_text(content)
    raw["data"]["unlabeled"] = str(bad)
    with pytest.raises(DataError, match=message):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.rounds").exists()


def test_a_model_that_cannot_be_loaded_fails_before_anything_is_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.9)
    raw["model"]["name"] = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match=r"model\.name"):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run.rounds").exists()


def test_a_teacher_with_other_labels_is_refused(tiny_model_dir: Path, tmp_path: Path, trained_tiny_run: Path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_tiny_run, teacher)
    (teacher / "labels.json").write_text(json.dumps(["happy", "sad", "meh"]))  # the same names, another order
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.9, teacher=str(teacher))
    with pytest.raises(ConfigError, match=r"train.semi_supervised.teacher: .*same labels in the same order"):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))
    raw["train"]["semi_supervised"]["teacher"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"train.semi_supervised.teacher: .*not found"):
        self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run.rounds").exists()


def test_a_teacher_labels_the_first_round(
    tiny_model_dir: Path, tmp_path: Path, trained_tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.34, teacher=str(trained_tiny_run))
    _Recorder(monkeypatch)
    self_train(validate_config(raw), show_progress=False, console=Console(file=io.StringIO()))
    report = json.loads((tmp_path / "run" / "self_training.json").read_text())
    assert report["rounds"][1]["labelled_by"] == str(trained_tiny_run.absolute())
    assert report["settings"]["teacher"] == str(trained_tiny_run.absolute())


def test_the_train_command_dispatches_to_self_training(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneforge import cli
    from tuneforge.train import self_training

    raw = _st_config(tiny_model_dir, tmp_path, epochs=1, rounds=1, threshold=0.9)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    calls: list[tuple[Any, dict]] = []

    def fake(config: Any, **kwargs: Any) -> loop.TrainResult:
        calls.append((config, kwargs))
        return loop.TrainResult(run_dir=Path(config.output.dir), metrics={})

    monkeypatch.setattr(self_training, "self_train", fake)
    assert cli.main(["train", str(config_file), "--resume", "--no-progress"]) == 0
    assert len(calls) == 1
    config, kwargs = calls[0]
    assert config.train.semi_supervised.rounds == 1
    assert kwargs["resume"] is True and kwargs["overwrite"] is False and kwargs["show_progress"] is False
