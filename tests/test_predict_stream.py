"""``tuneforge predict RUN --file F --out P``: chunked, constant memory, atomic, every input format."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.conftest import make_rows, write_csv
from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.errors import DataError
from tuneforge.infer.predictor import Prediction, Predictor
from tuneforge.infer.stream import TextSource, stream_predictions

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_run(trained_tiny_run: Path) -> Path:
    return trained_tiny_run


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor(tiny_run)


class CountingPredictor:
    """Stands in for the model: cheap, and records how many texts it was given at a time."""

    labels = ("a", "b")

    def __init__(self, fail_on_call: int | None = None, error: BaseException | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on_call = fail_on_call
        self.error = error or RuntimeError("boom")

    def predict(self, texts: list[str], *, top_k: int = 1) -> list[Prediction]:
        self.calls.append(len(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise self.error
        return [Prediction("a" if len(t) % 2 else "b", 0.75, [("a", 0.75), ("b", 0.25)][:top_k]) for t in texts]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_csv_to_csv_matches_the_predictor_in_order(tiny_run: Path, predictor: Predictor, tmp_path: Path) -> None:
    rows = make_rows(53, seed=8)
    rows[3] = ('she said "great", then\nleft, slowly', "happy")  # quotes, a comma and a newline survive
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "preds.csv"
    code = main(["predict", str(tiny_run), "--file", str(source), "--out", str(out), "--chunk-size", "10",
                 "--top-k", "2", "--no-progress"])  # fmt: skip
    assert code == 0
    written = _read_csv(out)
    assert list(written[0]) == ["row", "text", "label", "probability", "label_2", "probability_2"]
    texts = [text for text, _ in rows]
    assert [r["text"] for r in written] == texts
    assert [int(r["row"]) for r in written] == list(range(1, 54))
    expected = predictor.predict(texts, top_k=2)
    assert [r["label"] for r in written] == [p.label for p in expected]
    assert [r["label_2"] for r in written] == [p.top_k[1][0] for p in expected]
    for r, p in zip(written, expected, strict=True):
        assert float(r["probability"]) == pytest.approx(p.probability, abs=1e-5)


def test_every_input_format(tiny_run: Path, predictor: Predictor, tmp_path: Path) -> None:
    texts = [text for text, _ in make_rows(12, seed=9)]
    expected = [p.label for p in predictor.predict(texts)]
    tsv = tmp_path / "in.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in texts), encoding="utf-8")
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(texts[:6]) + "\n\n  \n" + "\r\n".join(texts[6:]) + "\n", encoding="utf-8")
    parquet = tmp_path / "in.parquet"
    import pandas as pd

    pd.DataFrame({"text": texts}).to_parquet(parquet)
    cases = [(tsv, "sentence", "jsonl"), (jsonl, "body", "tsv"), (txt, "text", "csv"), (parquet, "text", "jsonl")]
    for source, column, out_format in cases:
        out = tmp_path / f"out-{source.suffix[1:]}.{out_format}"
        args = ["predict", str(tiny_run), "--file", str(source), "--out", str(out), "--text-column", column]
        assert main([*args, "--chunk-size", "5", "--no-progress"]) == 0, source
        if out_format == "jsonl":
            records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            labels = [r["label"] for r in records]
            assert [r["text"] for r in records] == texts
            assert set(records[0]) == {"row", "text", "label", "probability", "top_k"}
        elif out_format == "tsv":
            lines = out.read_text(encoding="utf-8").splitlines()
            assert lines[0] == "row\ttext\tlabel\tprobability"
            labels = [line.split("\t")[2] for line in lines[1:]]
        else:
            written = _read_csv(out)
            labels = [r["label"] for r in written]
            # .txt: blank lines are skipped; the row is the line number in the file.
            assert [int(r["row"]) for r in written][5:8] == [6, 9, 10]
        assert labels == expected, source


def test_reading_and_writing_happen_in_chunks(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", make_rows(1003, seed=1))
    model = CountingPredictor()
    result = stream_predictions(model, TextSource(source), tmp_path / "out.jsonl", chunk_size=100, show_progress=False)
    assert result.rows == 1003
    assert model.calls == [100] * 10 + [3]


def test_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    def peak(rows: int) -> int:
        source = write_csv(tmp_path / f"in-{rows}.csv", make_rows(rows, seed=2))
        tracemalloc.start()
        stream_predictions(
            CountingPredictor(), TextSource(source), tmp_path / f"out-{rows}.csv", chunk_size=200, show_progress=False
        )
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(2_000), peak(40_000)
    # 20x the rows (~1.6 MB more input); the peak stays that of one chunk.
    assert large < small * 1.5 + 200_000, (small, large)


def test_output_is_atomic_on_a_bad_row(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = make_rows(30, seed=3)
    source = tmp_path / "in.csv"
    write_csv(source, rows)
    with source.open("a", encoding="utf-8") as handle:
        handle.write("one,too,many\n")
    out = tmp_path / "preds.csv"
    out.write_text("earlier predictions\n", encoding="utf-8")
    capsys.readouterr()
    code = main(["predict", str(tiny_run), "--file", str(source), "--out", str(out), "--chunk-size", "8",
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT
    assert err == [
        f"error: {source}: row 31 (line 32): expected 2 fields, found 3 (an unquoted delimiter in the text?)"
    ]
    assert out.read_text(encoding="utf-8") == "earlier predictions\n", "the earlier file is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "preds.csv"], "no temporary file left"


def test_interrupted_run_leaves_no_output(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", make_rows(50, seed=4))
    model = CountingPredictor(fail_on_call=3, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        stream_predictions(model, TextSource(source), tmp_path / "out.csv", chunk_size=10, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_progress_bar_is_shown(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", make_rows(40, seed=5))
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    stream_predictions(CountingPredictor(), TextSource(source), tmp_path / "o.csv", chunk_size=10, console=console)
    shown = buffer.getvalue()
    assert "classifying" in shown and "100%" in shown and "40 texts" in shown


@pytest.mark.parametrize(
    ("make", "extra", "fragment"),
    [
        (lambda d: d / "missing.csv", [], "missing.csv: file not found"),
        (lambda d: write_csv(d / "in.csv", [("a", "b")], header=("body", "label")), [], "missing column 'text'"),
        (lambda d: write_csv(d / "in.csv", [("a", "b")]), ["--out", "x.parquet"], "--out: unsupported file type"),
        (lambda d: write_csv(d / "in.csv", [("a", "b")]), ["--json"], "--json: not with --out"),
        (lambda d: write_csv(d / "in.csv", [("a", "b")]), ["--chunk-size", "0"], "--chunk-size: must be at least 1"),
        (lambda d: write_csv(d / "in.csv", [("a", "b")]), ["--top-k", "0"], "--top-k: must be at least 1"),
        (lambda d: _latin1(d / "in.txt"), [], "in.txt: line 1: cannot decode bytes with encoding 'utf-8'"),
        (lambda d: _bad_jsonl(d / "in.jsonl"), [], "in.jsonl: line 2: not valid JSON"),
        (lambda d: _write(d / "in.xlsx", "x"), [], "unsupported file type .xlsx"),
        (lambda d: _write(d / "in.csv", ""), [], "in.csv: file is empty"),
        (lambda d: _write(d / "in.csv", "text,label\n"), [], "in.csv: has no texts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, make, extra: list[str], fragment: str
) -> None:
    source = make(tmp_path)
    capsys.readouterr()
    args = ["predict", str(tiny_run), "--file", str(source), "--no-progress"]
    if "--out" not in extra:
        args += ["--out", str(tmp_path / "preds.csv")]
    code = main([*args, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "preds.csv").exists()


def test_out_needs_a_file(tiny_run: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["predict", str(tiny_run), "some text", "--out", str(tmp_path / "p.csv")]) == EXIT_BAD_INPUT
    assert "--out: needs --file FILE" in capsys.readouterr().err


def test_latin1_input_with_encoding_option(tiny_run: Path, tmp_path: Path) -> None:
    source = _latin1(tmp_path / "in.txt")
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(tiny_run), "--file", str(source), "--out", str(out), "--encoding", "latin-1",
                 "--no-progress"]) == 0  # fmt: skip
    assert [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()] == [
        "café lovely",
        "naïve plot",
    ]


def test_text_source_reports_rows_lazily(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", make_rows(5, seed=6))
    iterator = iter(TextSource(source))
    assert next(iterator)[0] == 1
    with pytest.raises(DataError, match="pass --text-column"):
        TextSource(source, text_column="body")


def _latin1(path: Path) -> Path:
    path.write_bytes("café lovely\nnaïve plot\n".encode("latin-1"))
    return path


def _bad_jsonl(path: Path) -> Path:
    path.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    return path


def _write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def test_txt_gives_one_prediction_per_line(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Only \n ends a line: U+2028, U+0085, form feed and group separator are part of a text (str.splitlines
    # would split at each), with or without --out.
    texts = ["great film\u2028still one", "awful plot\x85still two", "okay\x0cthree", "fine\x1dfour", "plain five"]
    source = _write(tmp_path / "in.txt", "\n".join(texts[:3]) + "\r\n" + "\n".join(texts[3:]) + "\n")
    capsys.readouterr()
    assert main(["predict", str(tiny_run), "--file", str(source), "--json"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\n")
    assert [json.loads(line)["text"] for line in printed] == texts
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(tiny_run), "--file", str(source), "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").rstrip("\n").split("\n")]
    assert [(r["row"], r["text"]) for r in records] == list(enumerate(texts, start=1))
