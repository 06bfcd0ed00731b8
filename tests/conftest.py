"""Shared fixtures: a tiny randomly initialised BERT and small invented datasets."""

from __future__ import annotations

import csv
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = {
    "happy": ["great", "lovely", "superb", "fantastic", "pleasant", "delightful"],
    "sad": ["awful", "terrible", "boring", "dreadful", "poor", "horrible"],
    "meh": ["okay", "average", "fine", "plain", "ordinary", "decent"],
}
FILLER = ["the", "film", "was", "really", "quite", "and", "a", "story", "plot", "acting", "very", "so"]


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite's caches (teacher logits, converted models, paraphrases) in a folder of its own, never the
    user's ~/.cache/tuneforge; subprocesses inherit it. A test that needs a fresh one sets its own."""
    before = os.environ.get("TUNEFORGE_CACHE")
    os.environ["TUNEFORGE_CACHE"] = str(tmp_path_factory.mktemp("tuneforge-cache"))
    yield
    if before is None:
        os.environ.pop("TUNEFORGE_CACHE", None)
    else:
        os.environ["TUNEFORGE_CACHE"] = before


def make_rows(n: int, seed: int, labels: tuple[str, ...] = ("happy", "sad", "meh")) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(FILLER, rng.randint(2, 8)) + [rng.choice(WORDS[label]) for _ in range(rng.randint(1, 2))]
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece vocabulary covering the invented data."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = sorted({w for ws in WORDS.values() for w in ws} | set(FILLER))
    vocab = specials + chars + ["##" + c for c in chars] + words
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_data(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": write_csv(tmp_path / "train.csv", make_rows(150, seed=1)),
        "test": write_csv(tmp_path / "test.csv", make_rows(30, seed=2)),
    }


def tiny_config(model_dir: Path, data: dict[str, Path], out: Path, **train: object) -> dict:
    """A raw config dict for a fast run on the tiny model."""
    return {
        "model": {"name": str(model_dir), "max_length": 32},
        "data": {
            "train": str(data["train"]),
            "test": str(data.get("test")) if data.get("test") else None,
            "validation_size": 0.2,
        },
        "train": {
            "epochs": 3,
            "batch_size": 16,
            "learning_rate": 5e-3,
            "head_learning_rate": 5e-3,
            "threads": 1,
            "checkpoint_every_steps": 4,
            **train,
        },
        # The tiny model's embeddings are random: unlike a pretrained model's, they must learn.
        "finetune": {"freeze_embeddings": False},
        "output": {"dir": str(out)},
    }


@pytest.fixture(scope="session")
def trained_tiny_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory trained once per test session on the tiny model (a few seconds); read-only for tests."""
    from tuneforge.config import validate_config
    from tuneforge.train.loop import train

    folder = tmp_path_factory.mktemp("trained-run")
    data = {"train": write_csv(folder / "train.csv", make_rows(90, seed=11))}
    raw = tiny_config(tiny_model_dir, data, folder / "run", epochs=2)
    return train(validate_config(raw), show_progress=False).run_dir


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> tuple[str, str] | None:
    """Debian's ``chromium`` and ``chromedriver`` (``make test`` installs them as root), or None."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if Path(p).is_file()), None
    )
    return (browser, driver) if browser and driver else None


NO_SELENIUM = "selenium is not installed (pip install -e '.[dev]')"
# Screenshots of the browser tests, for a person to look at.
ARTIFACTS = Path(__file__).parent / "artifacts"


def browser_tests() -> pytest.MarkDecorator:
    """Called at the top of a module of browser tests: skips the module where selenium is not installed, and
    returns its ``pytestmark``, which skips each test, with the reason, where no Chromium or driver is found."""
    pytest.importorskip("selenium", reason=NO_SELENIUM)
    return pytest.mark.skipif(
        find_chromium() is None,
        reason="no headless Chromium found: install Debian's chromium and chromium-driver (make test does so as root)",
    )


def wait_until(browser: Any, condition: Any, timeout: float = 20) -> Any:
    """What ``condition(browser)`` returns once it is truthy; Selenium's TimeoutException after ``timeout`` s."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Selenium; the test is skipped, with the reason, where it is missing."""
    pytest.importorskip("selenium", reason=NO_SELENIUM)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        pytest.skip("no headless Chromium found: install Debian's chromium and chromium-driver (make test does so)")
    binary, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,1500",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    instance = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    instance.set_page_load_timeout(30)
    try:
        yield instance
    finally:
        instance.quit()
