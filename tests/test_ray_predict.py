"""``tuneforge predict RUN --file GLOB --out DIR --ray``: every row scored once, in order, as in one process.

The Ray tests share one local Ray instance (two CPUs) for the module: starting one takes seconds. They
are skipped, with the reason, where the ``ray`` extra is not installed; the helpers that need no Ray
(globs, URIs, the shipped run, the output folder's guard) are tested either way.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_rows, write_csv
from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.infer.predictor import Predictor
from tuneforge.infer.ray_predict import (
    MANIFEST_FILE,
    PredictorActor,
    check_out_dir,
    expand_inputs,
    pack_run,
    predict_with_ray,
    read_file_batches,
    unpack_run,
)
from tuneforge.infer.stream import TextSource

N_CSV, N_JSONL = 180, 120


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with 300 texts in two files: 180 in a CSV (one with a quoted newline), 120 in a JSONL."""
    folder = tmp_path_factory.mktemp("ray-inputs")
    rows = make_rows(N_CSV, seed=21)
    rows[7] = ('she said "fine", then\nleft', "meh")
    write_csv(folder / "a.csv", rows)
    _write_jsonl(folder / "b.jsonl", [text for text, _ in make_rows(N_JSONL, seed=22)])
    return folder


def _expected(folder: Path) -> list[tuple[str, int, str]]:
    """(file, row, text) in the promised order: files sorted by path, rows as the one-process reader numbers them."""
    out = []
    for path in sorted(folder.iterdir()):
        out += [(str(path.resolve()), row, text) for row, text in TextSource(path)]
    return out


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


def _read_out(out: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(out).to_pylist()


def test_every_row_once_in_order_with_the_one_process_answers(
    ray_instance: Any, trained_tiny_run: Path, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds"
    result = predict_with_ray(
        trained_tiny_run,
        str(inputs / "*"),
        out,
        actors=2,
        threads=1,
        batch_size=32,
        rows_per_part=128,
        show_progress=False,
    )
    assert (result.rows, result.files, result.actors, result.threads) == (N_CSV + N_JSONL, 2, 2, 1)
    assert len(result.rows_per_actor) == 2 and all(n > 0 for n in result.rows_per_actor.values())  # a pool
    assert sum(result.rows_per_actor.values()) == result.rows
    parts = sorted(p.name for p in out.glob("*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # 128 + 128 + 44 rows
    records = _read_out(out)
    assert list(records[0]) == ["file", "row", "text", "label", "probability"]
    expected = _expected(inputs)
    assert [(r["file"], r["row"], r["text"]) for r in records] == expected  # each once, in order
    answers = Predictor(trained_tiny_run).predict([text for _, _, text in expected])
    assert [r["label"] for r in records] == [a.label for a in answers]
    assert [r["probability"] for r in records] == pytest.approx([a.probability for a in answers], abs=1e-5)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert (manifest["rows"], manifest["parts"], manifest["inputs"]) == (300, 3, sorted({f for f, _, _ in expected}))


def test_cli_replaces_an_earlier_output_and_writes_top_k(
    ray_instance: Any, trained_tiny_run: Path, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds"
    out.mkdir()
    (out / MANIFEST_FILE).write_text("{}")
    (out / "part-00007.parquet").write_bytes(b"an earlier run's part")
    args = ["predict", str(trained_tiny_run), "--file", str(inputs / "a.csv"), "--out", str(out), "--ray"]
    code = main([*args, "--actors", "1", "--top-k", "2", "--chunk-size", "50", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "part-00000.parquet"]
    records = _read_out(out)
    assert [r["row"] for r in records] == list(range(1, N_CSV + 1))
    assert list(records[0]) == ["file", "row", "text", "label", "probability", "label_2", "probability_2"]
    assert all(r["label"] != r["label_2"] and r["probability"] >= r["probability_2"] for r in records)


def test_a_bad_line_read_on_a_worker_is_a_clean_error(
    ray_instance: Any, trained_tiny_run: Path, tmp_path: Path
) -> None:
    texts = [text for text, _ in make_rows(200, seed=5)]
    path = _write_jsonl(tmp_path / "in.jsonl", texts)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[149] = '{"text": "unfinished'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "preds"
    with pytest.raises(DataError, match="line 150"):
        predict_with_ray(trained_tiny_run, str(path), out, actors=1, threads=1, batch_size=64, show_progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]  # no staging folder left behind


def test_a_shipped_run_is_unpacked_where_its_path_is_missing(
    ray_instance: Any, trained_tiny_run: Path, tmp_path: Path
) -> None:
    packed = pack_run(trained_tiny_run)
    actor = PredictorActor(
        str(tmp_path / "not-on-this-node"), threads=1, form="auto", top_k=1, shipped=[ray_instance.put(packed), "t1"]
    )
    assert actor.predictor.run.path != trained_tiny_run
    import numpy as np

    texts = ["the film was great", "awful and sad"]
    batch = {"source": np.zeros(2, dtype=np.int64), "row": np.array([1, 2]), "text": np.asarray(texts, dtype=object)}
    answers = Predictor(trained_tiny_run).predict(texts)
    assert list(actor(batch)["label"]) == [a.label for a in answers]


# --- without Ray ----------------------------------------------------------------------------------------


def test_globs_and_file_uris_list_the_same_files_sorted(inputs: Path) -> None:
    local = expand_inputs(str(inputs / "*"))
    assert local == [str((inputs / "a.csv").resolve()), str((inputs / "b.jsonl").resolve())]
    assert expand_inputs(f"file://{inputs.resolve()}/*.jsonl") == [f"file://{inputs.resolve()}/b.jsonl"]
    nested = inputs.parent / "nested"
    (nested / "x" / "y").mkdir(parents=True, exist_ok=True)
    write_csv(nested / "x" / "y" / "c.csv", make_rows(3, seed=1))
    assert expand_inputs(f"file://{nested.resolve()}/**/*.csv") == [f"file://{nested.resolve()}/x/y/c.csv"]
    with pytest.raises(DataError, match="no files match"):
        expand_inputs(str(inputs / "*.parquet"))
    (nested / "notes.md").write_text("not texts to classify")
    with pytest.raises(DataError, match="unsupported file type"):
        expand_inputs(str(nested / "**" / "*"))
    with pytest.raises(DataError, match="not found"):
        expand_inputs(f"file://{inputs.resolve()}/missing.csv")


def test_a_uri_is_read_like_the_local_file(inputs: Path) -> None:
    uri = f"file://{inputs.resolve()}/a.csv"
    batches = list(
        read_file_batches({"source": [0]}, files=[uri], text_column="text", encoding="utf-8", chunk_size=100)
    )
    assert [len(b["row"]) for b in batches] == [100, 80]
    got = [(int(r), str(t)) for b in batches for r, t in zip(b["row"], b["text"], strict=True)]
    assert got == list(TextSource(inputs / "a.csv"))


def test_out_must_be_new_empty_or_an_earlier_output(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TuneforgeError, match="refusing to replace"):
        check_out_dir(tmp_path / "mine")
    (tmp_path / "file.parquet").write_text("x")
    with pytest.raises(TuneforgeError, match="not a folder"):
        check_out_dir(tmp_path / "file.parquet")
    with pytest.raises(TuneforgeError, match="drop --ray"):
        check_out_dir(tmp_path / "preds.csv")


def test_pack_leaves_the_resume_checkpoints_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("labels.json", "model/config.json", "checkpoints/last/state.safetensors"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    unpacked = unpack_run(pack_run(run), f"test-{tmp_path.name}")
    assert sorted(p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()) == [
        "labels.json",
        "model/config.json",
    ]


def test_without_the_extra_the_cli_says_what_to_install(
    trained_tiny_run: Path, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    code = main(
        ["predict", str(trained_tiny_run), "--file", str(inputs / "a.csv"), "--out", str(tmp_path / "o"), "--ray"]
    )
    assert code == EXIT_BAD_INPUT
    assert "pip install 'tuneforge[ray]'" in capsys.readouterr().err
