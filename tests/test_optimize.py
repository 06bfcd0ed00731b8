"""`tuneforge optimize` on the tiny BERT: variants, the picker, the chosen run directory, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import make_rows, tiny_config
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError, RunDirError
from tuneforge.infer.predictor import Predictor
from tuneforge.optimize.measure import Measurement, paired_drop, pick_variant
from tuneforge.optimize.pipeline import VARIANTS, OptimizeOptions, _drop_warning, optimize_run
from tuneforge.train.loop import train

FAST = {"recovery_epochs": 1, "distill_epochs": 1, "threads": 1}


@pytest.fixture()
def tiny_run(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    train(validate_config(tiny_config(tiny_model_dir, tiny_data, out, epochs=4)), show_progress=False)
    return out


def _m(name: str, accuracy: float, p50: float, size: float, throughput: float = 100.0) -> Measurement:
    return Measurement(name, accuracy, accuracy, p50, p50 * 1.5, throughput, size, None)


def test_picker_respects_the_accuracy_budget() -> None:
    ms = [
        _m("torch-fp32", 90.0, 10.0, 90.0),
        _m("onnx-int8", 89.5, 4.0, 23.0),
        _m("distilled-onnx-int8", 88.0, 2.0, 18.0),
    ]
    assert pick_variant(ms, baseline="torch-fp32", max_drop=1.0, target="latency")[0].name == "onnx-int8"
    assert pick_variant(ms, baseline="torch-fp32", max_drop=2.0, target="latency")[0].name == "distilled-onnx-int8"
    assert pick_variant(ms, baseline="torch-fp32", max_drop=0.0, target="latency")[0].name == "torch-fp32"
    assert pick_variant(ms, baseline="torch-fp32", max_drop=1.0, target="size")[0].name == "onnx-int8"
    chosen, rejected = pick_variant(ms, baseline="torch-fp32", max_drop=0.4, target="size")
    assert chosen.name == "torch-fp32" and len(rejected) == 2 and "onnx-int8" in rejected[0]


def test_paired_drop_counts_only_the_texts_the_two_disagree_on() -> None:
    same = np.array([True] * 90 + [False] * 10)
    assert paired_drop(same, same.copy()) == (0.0, 0.0)
    # 4 texts only the baseline gets right, 1 only the variant: a 3-point drop on 100 texts,
    # standard error sqrt(5 - 9/100) / 100 = 2.216 points.
    variant = same.copy()
    variant[:4] = False
    variant[95] = True
    drop, upper = paired_drop(same, variant)
    assert drop == pytest.approx(3.0) and upper == pytest.approx(3.0 + 1.96 * 2.2159, abs=1e-3)
    # The same disagreement rate on 100x the texts: the same drop, a far tighter bound.
    drop_many, upper_many = paired_drop(np.tile(same, 100), np.tile(variant, 100))
    assert drop_many == pytest.approx(3.0) and upper_many < 3.5 < upper
    assert paired_drop(~same, ~variant)[0] == pytest.approx(-3.0)  # a better variant: negative drop
    with pytest.raises(ValueError):
        paired_drop(same, variant[:50])


def test_choice_on_too_few_validation_texts_is_flagged() -> None:
    baseline = np.array([True] * 180 + [False] * 14)  # 194 texts, as Financial PhraseBank's 5% split
    variant = baseline.copy()
    variant[:3] = False  # 1.5 points worse: within a 2-point budget, but 194 texts cannot show that
    builder = SimpleNamespace(right={"torch-fp32": baseline, "distilled-onnx-int8": variant}, val_y=[0] * 194)
    warning = _drop_warning(builder, "distilled-onnx-int8", max_drop=2.0)
    assert warning is not None and "194 validation texts" in warning and "--data FILE" in warning
    assert _drop_warning(builder, "torch-fp32", max_drop=2.0) is None
    many = SimpleNamespace(right={name: np.tile(r, 50) for name, r in builder.right.items()}, val_y=[0] * (194 * 50))
    assert _drop_warning(many, "distilled-onnx-int8", max_drop=2.0) is None  # 9,700 texts: the bound holds
    better = baseline.copy()
    better[:5], better[180:187] = False, True  # 1.03 points better on 12 disagreements: a drop stays possible
    builder.right["distilled-onnx-int8"] = better
    warning = _drop_warning(builder, "distilled-onnx-int8", max_drop=0.5)
    assert warning is not None and "1.03 points above torch-fp32" in warning


def test_optimize_builds_measures_and_keeps_the_best(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "opt"
    result = optimize_run(tiny_run, out_dir=out, options=OptimizeOptions(max_drop=5.0, **FAST))

    names = [m.name for m in result.measurements]
    assert names == list(VARIANTS)
    report = json.loads((out / "optimize_report.json").read_text())
    assert report["chosen"] == result.chosen and (out / "frontier.png").is_file()
    assert ("**Warning**" in (out / "optimize_report.md").read_text()) == (report["warning"] is not None)
    assert "| variant |" in (out / "optimize_report.md").read_text()
    baseline = next(m for m in result.measurements if m.name == "torch-fp32")
    chosen = next(m for m in result.measurements if m.name == result.chosen)
    assert chosen.accuracy >= baseline.accuracy - 5.0

    sizes = {m.name: m.size_mb for m in result.measurements}
    assert sizes["onnx-int8"] < sizes["onnx-fp32"]
    params = {m.name: m.parameters for m in result.measurements}
    assert params["pruned"] < params["torch-fp32"] and params["distilled"] < params["torch-fp32"]

    texts = [t for t, _ in make_rows(12, seed=9)]
    reference = np.array(Predictor(tiny_run).predict_proba(texts))
    onnx = Predictor(out / "variants" / "onnx-fp32")
    assert onnx.form == "onnx"
    assert np.allclose(np.array(onnx.predict_proba(texts)), reference, atol=1e-4)
    assert Predictor(out / "variants" / "torch-int8").form == "model"
    # The chosen variant is itself a run directory, loadable like any other.
    chosen_predictor = Predictor(out)
    assert [p.label for p in chosen_predictor.predict(texts)]
    assert json.loads((out / "variant.json").read_text())["name"] == result.chosen


def test_unknown_variant_is_an_error(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown variant 'onnx-int4'"):
        optimize_run(tiny_run, out_dir=tmp_path / "o", options=OptimizeOptions(variants=("onnx-int4",)))
    assert not (tmp_path / "o").exists()


def test_run_without_validation_data_is_an_error(tiny_run: Path, tiny_data: dict, tmp_path: Path) -> None:
    tiny_data["train"].unlink()  # the run's training file (its validation split comes from it) is gone
    with pytest.raises(RunDirError, match="no validation data to measure variants on"):
        optimize_run(tiny_run, out_dir=tmp_path / "o", options=OptimizeOptions(variants=("onnx-fp32",)))
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(RunDirError, match="already exists"):
        optimize_run(tiny_run, out_dir=tmp_path / "o", options=OptimizeOptions(variants=("onnx-fp32",)))
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_overwrite_replaces_an_earlier_run_and_nothing_else(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tuneforge.cli import EXIT_BAD_INPUT, main
    from tuneforge.rundir import is_run_dir

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["optimize", str(trained_tiny_run), "--out", str(home), "--overwrite"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and str(home) in err and "not a tuneforge run directory" in err
    assert [p.name for p in home.iterdir()] == ["notes.txt"] and (home / "notes.txt").read_text() == "keep me"
    holder = trained_tiny_run.parent
    before = sorted(p.name for p in holder.iterdir())
    with pytest.raises(RunDirError, match="is or holds the source run"):
        optimize_run(
            trained_tiny_run, out_dir=holder, options=OptimizeOptions(variants=("torch-fp32",)), overwrite=True
        )
    assert sorted(p.name for p in holder.iterdir()) == before

    out = tmp_path / "opt"
    options = OptimizeOptions(variants=("torch-fp32",), threads=1)
    optimize_run(trained_tiny_run, out_dir=out, options=options)
    (out / "stale.txt").write_text("from the earlier run")
    optimize_run(trained_tiny_run, out_dir=out, options=options, overwrite=True)
    assert is_run_dir(out) and not (out / "stale.txt").exists()


def test_trimmed_variants_are_built_measured_and_predict(tiny_run: Path, tmp_path: Path) -> None:
    from tuneforge.models.runs import load_run_backend
    from tuneforge.rundir import open_run_dir

    sample = tmp_path / "sample.txt"
    sample.write_text("xylophone\n", encoding="utf-8")
    out = tmp_path / "opt"
    options = OptimizeOptions(variants=("trimmed", "trimmed-onnx-int8"), vocab_sample=sample, max_drop=100.0, **FAST)
    result = optimize_run(tiny_run, out_dir=out, options=options)

    measured = {m.name: m for m in result.measurements}
    assert list(measured) == ["torch-fp32", "trimmed", "trimmed-onnx-int8"]
    assert measured["trimmed"].size_mb < measured["torch-fp32"].size_mb
    assert measured["trimmed"].parameters < measured["torch-fp32"].parameters
    info = json.loads((out / "variants" / "trimmed" / "variant.json").read_text())
    assert info["trim"]["vocab_after"] < info["trim"]["vocab_before"] and info["vocab_sample"] == str(sample)
    assert info["validation"]["accuracy"] == measured["trimmed"].accuracy

    _, tokenizer, _ = load_run_backend(open_run_dir(out / "variants" / "trimmed"))
    assert len(tokenizer) == info["trim"]["vocab_after"]
    # A word only the --vocab-sample file has is kept; one that no text used reads as unknown.
    assert tokenizer.unk_token_id not in tokenizer("xylophone").input_ids
    assert tokenizer.unk_token_id in tokenizer("jq").input_ids
    # Texts made of the training texts' pieces get the original run's predictions.
    texts = ["the film was great", "really boring plot and acting", "a very ordinary story", "so lovely"]
    assert all(tokenizer.unk_token_id not in tokenizer(t).input_ids for t in texts)
    reference = np.array(Predictor(tiny_run).predict_proba(texts))
    assert np.allclose(np.array(Predictor(out / "variants" / "trimmed").predict_proba(texts)), reference, atol=1e-5)
    onnx = Predictor(out / "variants" / "trimmed-onnx-int8")
    assert onnx.form == "onnx" and [p.label for p in onnx.predict(texts)]
    assert Predictor(out).predict(texts)  # the chosen variant's run directory


def test_bad_vocab_sample_is_an_error_before_anything_is_built(tiny_run: Path, tmp_path: Path) -> None:
    from tuneforge.errors import DataError

    options = OptimizeOptions(variants=("trimmed",), vocab_sample=tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"--vocab-sample: .*nope.txt: file not found"):
        optimize_run(tiny_run, out_dir=tmp_path / "o", options=options)
    assert not (tmp_path / "o").exists()
    options = OptimizeOptions(variants=("onnx-fp32",), vocab_sample=tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="--vocab-sample: only the trimmed variants use it"):
        optimize_run(tiny_run, out_dir=tmp_path / "o", options=options)
