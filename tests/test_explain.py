"""Word-level explanations on the tiny trained run: words, occlusion, integrated gradients, the CLI, the reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_rows, tiny_config, write_csv
from tuneforge.cli import EXIT_BAD_INPUT, main
from tuneforge.errors import DataError, ModelError
from tuneforge.explain import MAX_WORDS, Explanation, explain
from tuneforge.explain.occlusion import occlusion_texts
from tuneforge.explain.report import html_report, terminal_text
from tuneforge.explain.words import align_tokens, cleaned_with_spans, split_words
from tuneforge.infer.predictor import Predictor

torch.set_num_threads(1)


def train_learned_run(model_dir: Path, folder: Path) -> Path:
    """A tiny run that has really learnt its three labels (~3 s): ``trained_tiny_run`` answers about 1/3 for
    every text, and an explanation of a model that reads nothing would be all zeros. Shared with the
    server and browser tests of explanations."""
    from tuneforge.config import validate_config
    from tuneforge.train.loop import train

    data = {"train": write_csv(folder / "train.csv", make_rows(150, seed=11))}
    raw = tiny_config(model_dir, data, folder / "run", epochs=6)
    return train(validate_config(raw), show_progress=False).run_dir


@pytest.fixture(scope="module")
def learned_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_learned_run(tiny_model_dir, tmp_path_factory.mktemp("learned-run"))


@pytest.fixture(scope="module")
def predictor(learned_run: Path) -> Predictor:
    return Predictor(learned_run, threads=1, batch_size=MAX_WORDS + 1, open_set=False)


@pytest.fixture(scope="module")
def onnx_int8_run(learned_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int8 ONNX variant a server would run, built by ``tuneforge optimize`` from the run."""
    from tuneforge.optimize.pipeline import OptimizeOptions, optimize_run

    out = tmp_path_factory.mktemp("optimized") / "out"
    options = OptimizeOptions(variants=("onnx-int8",), max_drop=100.0, threads=1)
    optimize_run(learned_run, out_dir=out, options=options)
    return out / "variants" / "onnx-int8"


# --- words -----------------------------------------------------------------------------------------


def test_words_are_the_words_as_typed_with_their_offsets() -> None:
    text = "  I've LOST\tmy card!! "
    words = split_words(text)
    assert [w.text for w in words] == ["I've", "LOST", "my", "card!!"]
    assert all(text[w.start : w.end] == w.text for w in words)
    # Chinese and Japanese: a word a character; Latin runs inside them stay whole.
    assert [w.text for w in split_words("我的iPhone丢了，怎么办？")] == [
        "我", "的", "iPhone", "丢", "了", "，", "怎", "么", "办", "？",
    ]  # fmt: skip
    assert [w.text for w in split_words("カードをなくした")] == list("カードをなくした")
    assert split_words(" \t\n ") == []


def test_sub_words_are_merged_back_into_the_words(predictor: Predictor) -> None:
    # "unboxing" and "xq7" are not in the tiny vocabulary: several sub-word pieces each.
    text = "The unboxing  was SUPERB xq7"
    words = split_words(text)
    alignment = align_tokens(predictor.tokenizer, text, words, max_length=32, lowercase=False)
    tokens = predictor.tokenizer.convert_ids_to_tokens(alignment.input_ids)
    owners = alignment.word_of_token
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and owners[0] is None and owners[-1] is None
    assert len(tokens) > len(words) + 2, "some words really are split into several tokens"
    # Every word has tokens, in order, and every token between [CLS] and [SEP] belongs to a word.
    assert sorted(set(owners[1:-1])) == list(range(len(words)))
    assert owners[1:-1] == sorted(owners[1:-1])
    pieces = {i: "".join(t.removeprefix("##") for t, o in zip(tokens, owners, strict=True) if o == i) for i in range(5)}
    assert pieces == {0: "the", 1: "unboxing", 2: "was", 3: "superb", 4: "xq7"}


def test_chinese_characters_are_words_of_their_own(predictor: Predictor) -> None:
    text = "我的card丢了"
    words = split_words(text)
    assert [w.text for w in words] == ["我", "的", "card", "丢", "了"]
    alignment = align_tokens(predictor.tokenizer, text, words, max_length=32)
    assert sorted({o for o in alignment.word_of_token if o is not None}) == [0, 1, 2, 3, 4]
    found = explain(predictor, text, method="integrated_gradients")
    assert len(found.scores) == 5
    assert sum(found.scores) == pytest.approx(found.probability - found.baseline_probability + found.delta, abs=1e-5)


def test_cleaning_keeps_each_word_its_span() -> None:
    # Fullwidth letters (NFKC), an entity, lower-casing, collapsed spaces: spans follow the cleaned text.
    text = "ＡＷＦＵＬ   plot &amp; acting"
    words = split_words(text)
    cleaned, spans = cleaned_with_spans(text, words, lowercase=True)
    assert cleaned == "awful plot & acting"
    assert [cleaned[a:b] for a, b in spans] == ["awful", "plot", "&", "acting"]
    # NFKC turns U+00A8 into a space and a combining mark: the word stays one word, its span the whole piece.
    cleaned, spans = cleaned_with_spans("x a\u00a8b y", split_words("x a\u00a8b y"))
    assert [cleaned[a:b] for a, b in spans] == ["x", "a \u0308b", "y"]


# --- occlusion -------------------------------------------------------------------------------------


def test_occlusion_scores_are_probability_differences(predictor: Predictor) -> None:
    text = "the acting was superb"
    found = explain(predictor, text)
    assert isinstance(found, Explanation) and found.method == "occlusion"
    assert [w.text for w in found.words] == ["the", "acting", "was", "superb"]
    # The model learnt "superb" as a happy word: the explanation says so, and it outweighs every other word.
    # (Relative, not an absolute size: the tiny run is unsure, and uncalibrated when validation is all right.)
    assert found.label == "happy" and int(np.argmax(found.scores)) == 3
    assert found.scores[3] > 5 * max(abs(s) for s in found.scores[:3])
    rows = np.array(predictor.predict_proba(occlusion_texts(text, found.words)))
    index = predictor.labels.index(found.label)
    assert found.label == predictor.labels[int(np.argmax(rows[0]))]  # the model's best label by default
    assert found.probability == pytest.approx(rows[0, index], abs=1e-5)
    assert found.scores == pytest.approx(list(rows[0, index] - rows[1:, index]), abs=1e-5)
    # Another label, asked for: the same texts, that label's column.
    other = next(label for label in predictor.labels if label != found.label)
    assert explain(predictor, text, label=other).probability == pytest.approx(
        rows[0, predictor.labels.index(other)], abs=1e-5
    )


def test_occlusion_is_one_forward_pass(predictor: Predictor) -> None:
    passes: list[int] = []
    hook = predictor.classifier.model.register_forward_hook(
        lambda _m, args, kw, out: passes.append(1), with_kwargs=True
    )
    try:
        found = explain(predictor, "the plot was dull but the acting was superb and lovely")
    finally:
        hook.remove()
    assert len(found.scores) == 11 and len(passes) == 1


def test_a_word_the_model_cannot_see_scores_zero(predictor: Predictor) -> None:
    # max_length is 32 tokens: the words past it are cut off, so leaving one out changes nothing.
    text = "great film " + "the plot " * 20 + "awful"
    found = explain(predictor, text)
    assert found.words[-1].text == "awful"
    assert found.scores[-1] == pytest.approx(0.0, abs=1e-6)
    assert found.scores[-3:] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert max(abs(s) for s in found.scores[:2]) > 1e-4, "the words it reads do count"


def test_occlusion_runs_on_the_int8_onnx_variant(onnx_int8_run: Path) -> None:
    onnx = Predictor(onnx_int8_run, threads=1, batch_size=MAX_WORDS + 1)
    assert onnx.form == "onnx"
    found = explain(onnx, "the acting was superb and lovely")
    assert len(found.scores) == 6 and found.label in onnx.labels
    # The batch's first row is the text itself: its probability is the one a classification gives
    # (dynamic int8 quantizes activations per batch, hence not to the last digit).
    alone = onnx.predict_proba(["the acting was superb and lovely"])[0][onnx.labels.index(found.label)]
    assert found.probability == pytest.approx(alone, abs=0.05)
    with pytest.raises(ModelError, match=r"integrated gradients need the PyTorch model.*onnx"):
        explain(onnx, "the acting was superb", method="integrated_gradients")


# --- integrated gradients --------------------------------------------------------------------------


def test_integrated_gradients_add_up_to_the_difference_in_probability(predictor: Predictor) -> None:
    text = "the acting was superb and lovely"
    found = explain(predictor, text, method="integrated_gradients", steps=64)
    assert found.method == "integrated_gradients" and found.delta is not None
    assert found.baseline_probability is not None
    index = predictor.labels.index(found.label)
    assert found.probability == pytest.approx(predictor.predict_proba([text])[0][index], abs=1e-5)
    gap = found.probability - found.baseline_probability
    # Completeness: the words' scores add up to p(text) - p(baseline), off by captum's delta.
    assert sum(found.scores) == pytest.approx(gap + found.delta, abs=1e-5)
    assert abs(found.delta) < 0.01 * max(abs(gap), 0.05)
    assert found.to_dict()["delta"] == pytest.approx(found.delta, abs=1e-6)


def test_integrated_gradients_give_a_padding_word_nothing(predictor: Predictor) -> None:
    # "[PAD]" typed as a word is the padding token itself, which is also the baseline: exactly 0.
    found = explain(predictor, "superb [PAD] film", method="integrated_gradients")
    assert [w.text for w in found.words] == ["superb", "[PAD]", "film"]
    assert found.scores[1] == pytest.approx(0.0, abs=1e-7)
    assert abs(found.scores[0]) > 1e-4


def test_integrated_gradients_refuse_an_int8_pytorch_model(predictor: Predictor) -> None:
    import copy
    from types import SimpleNamespace

    from tuneforge.explain.integrated import torch_model_of
    from tuneforge.models.quantized import quantize_torch_dynamic

    quantized = quantize_torch_dynamic(copy.deepcopy(predictor.classifier.model))
    with pytest.raises(ModelError, match="int8-quantized"):
        torch_model_of(SimpleNamespace(classifier=SimpleNamespace(model=quantized), form="model"))


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_an_empty_text_is_refused(predictor: Predictor, text: str) -> None:
    with pytest.raises(DataError, match="the text is empty"):
        explain(predictor, text)


def test_a_text_over_the_word_limit_is_refused(predictor: Predictor) -> None:
    with pytest.raises(DataError, match=f"has {MAX_WORDS + 1} words; the limit is {MAX_WORDS}"):
        explain(predictor, "word " * (MAX_WORDS + 1))
    assert len(explain(predictor, "film " * MAX_WORDS).scores) == MAX_WORDS  # the limit itself is fine


def test_unknown_label_and_method_are_refused(predictor: Predictor) -> None:
    with pytest.raises(DataError, match="unknown label 'joyful'; the model's labels are 'happy'"):
        explain(predictor, "lovely", label="joyful")
    with pytest.raises(DataError, match="unknown method 'lime'"):
        explain(predictor, "lovely", method="lime")


# --- reports and the command line ------------------------------------------------------------------


def _example(text: str = "the film was awful <b>&</b>") -> Explanation:
    words = split_words(text)
    scores = [0.0, 0.02, -0.01, 0.4, -0.2, 0.0][: len(words)]
    return Explanation(text, words, scores, "sad", 0.8, "occlusion")


def test_terminal_text_highlights_words_by_sign() -> None:
    text = terminal_text(_example())
    assert "the film was awful <b>&</b>" in text.plain
    assert "for: awful +0.400, film +0.020" in text.plain and "against: <b>&</b> -0.200" in text.plain
    styles = {text.plain[span.start : span.end]: str(span.style) for span in text.spans}
    assert "on rgb(" in styles["awful"] and "on rgb(" in styles["<b>&</b>"]
    assert styles["awful"] != styles["<b>&</b>"]  # green and red
    assert "film" not in styles  # too faint to colour: 0.02 of 0.4


def test_html_report_is_self_contained_and_escaped() -> None:
    page = html_report([_example()], about="Run demo")
    assert not re.search(r"https?://|src=|<script|<link|@import|url\(", page)
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in page and "<b>&</b>" not in page
    marks = re.findall(r'<mark tabindex="0"[^>]*aria-label="([^"]*)"', page)
    assert marks == [
        "the: +0.000, neutral to sad",
        "film: +0.020, for sad",
        "was: -0.010, against sad",
        "awful: +0.400, for sad",
        "&lt;b&gt;&amp;&lt;/b&gt;: -0.200, against sad",
    ]


def test_cli_explains_in_the_terminal_and_as_json(learned_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(learned_run), "the acting was superb", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "the acting was superb" in out and "by occlusion" in out and "for:" in out
    assert main(["explain", str(learned_run), "awful plot", "--method", "ig", "--json", "--label", "sad"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["text"] == "awful plot" and record["label"] == "sad" and record["method"] == "integrated_gradients"
    assert [w["word"] for w in record["words"]] == ["awful", "plot"] and "delta" in record


def test_cli_writes_an_html_report_from_a_file(learned_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "texts.csv"
    data.write_text('id,message\n1,"great film, lovely acting"\n2,awful plot\n3,我的卡\n', encoding="utf-8")
    report = tmp_path / "report.html"
    argv = ["explain", str(learned_run), "--file", str(data), "--text-column", "message", "--html", str(report)]
    assert main(argv) == 0
    page = report.read_text(encoding="utf-8")
    assert page.count("<section") == 3
    assert len(re.findall(r'<mark tabindex="0"', page)) == 4 + 2 + 3
    assert not re.search(r"https?://|src=|<script|<link", page)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["   "], "text 1: explain: the text is empty"),
        (["word " * (MAX_WORDS + 1)], f"the limit is {MAX_WORDS}"),
        (["lovely", "--label", "joyful"], "unknown label 'joyful'"),
        (["lovely", "--method", "ig", "--form", "onnx"], "no ONNX model"),
        (["lovely", "--html", "report.txt"], "is not an .html file"),
        ([], "give texts as arguments or --file"),
    ],
)
def test_cli_bad_input_is_one_line(
    learned_run: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["explain", str(learned_run), *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_integrated_gradients_on_onnx(onnx_int8_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(onnx_int8_run), "lovely film", "--method", "ig"]) == EXIT_BAD_INPUT
    assert "integrated gradients need the PyTorch model" in capsys.readouterr().err


def test_tokenizer_without_offsets_is_a_clear_error() -> None:
    class PythonTokenizer:  # a "slow" tokenizer: no character offsets
        is_fast = False

    with pytest.raises(ModelError, match="need a fast tokenizer"):
        align_tokens(PythonTokenizer(), "lovely", split_words("lovely"), max_length=8)
