"""CJK text: the audit's vocabulary coverage warning, Traditional/Simplified conversion, word segmentation."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import write_csv
from tuneforge.config import DataConfig, ModelConfig, validate_config
from tuneforge.data import (
    LabelledTexts,
    audit_splits,
    clean_text,
    format_audit,
    prepare_data,
    segment_words,
)
from tuneforge.errors import ConfigError, DataError

# Invented review sentences (restaurant delivery and hotel stays), not taken from any dataset.
CHINESE = [
    "这家店的牛肉面味道很好，汤也够热，下次还会再点。",
    "送餐太慢了，等了一个多小时，饭菜全都凉了。",
    "酒店房间干净整洁，前台服务员态度非常热情。",
    "包装破了，汤洒了一袋子，客服也不理人。",
    "价格实惠，分量很足，两个人吃都够了。",
    "床单有污渍，空调噪音很大，晚上根本睡不着。",
    "早餐品种丰富，水果新鲜，位置离地铁站也近。",
    "菜太咸了，米饭还是硬的，不会再买了。",
]
ENGLISH = [
    "The noodles arrived hot and the broth was rich, I will order again.",
    "Delivery took over an hour and everything was cold by then.",
    "Clean room, friendly staff at the front desk, great location.",
    "The bag was torn and the soup had leaked everywhere.",
    "Good value and large portions, enough for two people.",
    "Stained sheets and a noisy air conditioner, I could not sleep.",
]


def labelled(texts: list[str]) -> LabelledTexts:
    labels = ["pos", "neg"] * (len(texts) // 2)
    return LabelledTexts(texts=texts, labels=labels, rows=list(range(1, len(texts) + 1)), source="mem.csv")


@pytest.fixture(scope="module")
def english_tokenizer() -> Any:
    """The default model's real tokenizer (its English uncased WordPiece vocabulary)."""
    from tuneforge.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig())


def test_audit_warns_on_chinese_text_with_the_default_english_model(english_tokenizer: Any) -> None:
    report = audit_splits(
        {"train": labelled(CHINESE[:6]), "validation": labelled(CHINESE[6:])}, tokenizer=english_tokenizer
    )
    coverage = report["splits"]["train"]["coverage"]
    assert coverage["unknown_share"] > 0.3  # most characters are not in the English vocabulary
    assert coverage["cjk_share"] > 0.8
    assert coverage["chars_per_token"] < 1.5  # one character per token: no word pieces
    assert len(report["warnings"]) == 2  # many unknown tokens, and a vocabulary with few CJK tokens
    assert all("model.name: multilingual-e5-small" in warning for warning in report["warnings"])
    assert "train " in report["warnings"][0] and "validation " in report["warnings"][0]
    warning_lines = [line for line in format_audit(report).splitlines() if line.startswith("warning: ")]
    assert len(warning_lines) == 2 and "[UNK]" in warning_lines[0]


def test_audit_does_not_warn_on_english_text_with_the_default_model(english_tokenizer: Any) -> None:
    report = audit_splits({"train": labelled(ENGLISH)}, tokenizer=english_tokenizer)
    coverage = report["splits"]["train"]["coverage"]
    assert coverage["unknown_share"] < 0.05 and coverage["cjk_share"] == 0.0
    assert coverage["chars_per_token"] > 3
    assert report["warnings"] == []
    assert "warning" not in format_audit(report)


def test_chinese_script_converts_between_traditional_and_simplified() -> None:
    traditional = "這家餐廳的服務很好，頭髮亂了，後來發現裡面有蟲。"
    simplified = "这家餐厅的服务很好,头发乱了,后来发现里面有虫。"  # NFKC makes the full-width commas ASCII
    assert clean_text(traditional, chinese_script="simplified") == simplified
    assert clean_text(simplified, chinese_script="traditional") == "這家餐廳的服務很好,頭髮亂了,後來發現裡面有蟲。"
    assert clean_text(traditional) == traditional.replace("，", ",")  # null: the script is left as is
    assert clean_text("Plain English", chinese_script="simplified", lowercase=True) == "plain english"


def test_chinese_script_is_validated_and_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.chinese_script: Input should be 'simplified' or 'traditional'"):
        validate_config({"data": {"train": "train.csv", "chinese_script": "cantonese"}})
    with pytest.raises(ConfigError, match=r"data\.chinese_script: .*'cantonese'"):
        clean_text("頭髮", chinese_script="cantonese")


def test_prepare_data_converts_the_training_texts(tmp_path: Path) -> None:
    rows = [("頭髮很亂，服務很差", "neg"), ("餐廳乾淨，環境很好", "pos")] * 5
    train = write_csv(tmp_path / "train.csv", rows)
    prepared = prepare_data(DataConfig(train=train, chinese_script="simplified", validation_size=0.2), seed=0)
    texts = set(prepared.train.texts) | set(prepared.validation.texts)
    assert texts == {"头发很乱,服务很差", "餐厅干净,环境很好"}
    assert prepared.audit["reading"]["train"]["texts_cleaned"] == 10


def test_predictor_cleans_with_the_runs_chinese_script(
    trained_tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneforge.infer import predictor as predictor_module

    run = tmp_path / "run"
    shutil.copytree(trained_tiny_run, run)
    config_path = run / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config["data"]["chinese_script"] = "traditional"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    seen: list[str] = []
    encode = predictor_module.encode_texts

    def spy(tokenizer: Any, texts: list[str], max_length: int) -> Any:
        seen.extend(texts)
        return encode(tokenizer, texts, max_length)

    monkeypatch.setattr(predictor_module, "encode_texts", spy)
    predictor_module.Predictor(run).predict(["头发很乱", "great film"])
    assert seen == ["頭髮很亂", "great film"]


def test_segment_words_chinese_with_jieba() -> None:
    pytest.importorskip("jieba", reason="jieba (the zh extra) is not installed")
    text = "这家酒店的服务态度很好 房间也很干净"
    [words] = segment_words([text], "zh")
    assert "".join(words) == text.replace(" ", "")  # every character kept, the space is no word
    assert "酒店" in words and "干净" in words  # words, not single characters
    assert len(words) < len(text.replace(" ", "")) / 1.5
    assert segment_words(["zh-Hant works too"], "zh-Hant") == [["zh", "-", "Hant", "works", "too"]]


def test_segment_words_other_languages_and_a_missing_jieba(monkeypatch: pytest.MonkeyPatch) -> None:
    assert segment_words(["two  words", "one"], "en") == [["two", "words"], ["one"]]
    with pytest.raises(DataError, match=r"no word segmenter for language 'ja'"):
        segment_words(["日本語の文章"], "ja")
    monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba now raises ImportError
    with pytest.raises(DataError, match=r"pip install 'tuneforge\[zh\]'"):
        segment_words(["中文"], "zh")
