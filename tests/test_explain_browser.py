"""Explanations in a real headless Chromium: the playground's words behind an answer, and the HTML report
opened from disk with no network. Skipped, with the reason, where no Chromium or driver is installed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ARTIFACTS, browser_tests, wait_until
from tests.test_explain import train_learned_run
from tests.test_serve import UvicornThread, settings_for
from tuneforge.cli import main
from tuneforge.serve.app import create_app

torch.set_num_threads(1)

pytestmark = browser_tests()
SCORE = re.compile(r"^(?P<word>\S+): (?P<score>[+\u2212-]\d\.\d{3}), (for|against|neutral to) happy$")


@pytest.fixture(scope="module")
def learned_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_learned_run(tiny_model_dir, tmp_path_factory.mktemp("learned-run"))


def _score(label: str) -> float:
    match = SCORE.match(label)
    assert match, label
    return float(match["score"].replace("\u2212", "-"))


def test_playground_highlights_the_words_behind_an_answer(browser: Any, learned_run: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with UvicornThread(create_app(settings_for(learned_run, max_wait_ms=1))) as server:
        server.wait_ready()
        browser.get(server.url + "/")
        wait_until(browser, lambda b: "labels, version" in b.find_element(By.ID, "status").text)
        text_box = browser.find_element(By.ID, "text")
        text_box.send_keys("the acting was superb")
        text_box.send_keys(Keys.CONTROL, Keys.ENTER)
        wait_until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#results button.explain"))
        assert browser.find_element(By.CSS_SELECTOR, "#results .top").text == "happy"

        # Reached and pressed with the keyboard: Tab from the Classify button lands on it.
        browser.find_element(By.ID, "submit").send_keys(Keys.TAB)
        button = browser.switch_to.active_element
        assert button.text == "Show the words behind \u201chappy\u201d"
        button.send_keys(Keys.ENTER)
        wait_until(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .explanation mark")) == 4)

        marks = browser.find_elements(By.CSS_SELECTOR, "#results .explanation mark")
        assert [m.text for m in marks] == ["the", "acting", "was", "superb"]
        assert browser.find_element(By.CSS_SELECTOR, "#results .explanation .words").text == "the acting was superb"
        labels = [m.get_attribute("aria-label") for m in marks]
        scores = [_score(label) for label in labels]
        assert max(range(4), key=scores.__getitem__) == 3, labels
        assert scores[3] > 5 * max(abs(s) for s in scores[:3]), labels
        assert labels[3].endswith("for happy")
        # The strongest word is coloured green; the colour is not the only carrier (names and tooltips).
        background = marks[3].value_of_css_property("background-color")
        red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
        assert (red, green, blue) == (22, 163, 74), background
        assert all(m.get_attribute("title") for m in marks)

        # Tab walks the words in order, each readable by its accessible name.
        visited = []
        for _ in range(4):
            browser.switch_to.active_element.send_keys(Keys.TAB)
            visited.append(browser.switch_to.active_element.get_attribute("aria-label"))
        assert visited == labels

        foreign = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => !n.startsWith(location.origin))"
        )
        assert foreign == []
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground-explain.png"))

        # A refused explanation says why, next to its answer.
        text_box.clear()
        text_box.send_keys("a " * 130)
        text_box.send_keys(Keys.CONTROL, Keys.ENTER)
        # The new answer replaces the old one, explanation and all.
        wait_until(
            browser,
            lambda b: (
                b.find_elements(By.CSS_SELECTOR, "#results button.explain")
                and not b.find_elements(By.CSS_SELECTOR, "#results .explanation mark")
            ),
        )
        browser.find_element(By.CSS_SELECTOR, "#results button.explain").click()
        wait_until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#results .explanation .failed"))
        failed = browser.find_element(By.CSS_SELECTOR, "#results .explanation .failed").text
        assert "130 words; the limit is 128" in failed


def test_the_html_report_opens_from_disk_without_network(browser: Any, learned_run: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    report = tmp_path / "report.html"
    argv = ["explain", str(learned_run), "the acting was superb", "awful plot", "--html", str(report)]
    assert main(argv) == 0
    browser.get(report.as_uri())
    assert browser.title == "tuneforge explanations"
    assert len(browser.find_elements(By.TAG_NAME, "section")) == 2
    marks = browser.find_elements(By.CSS_SELECTOR, "section mark")
    assert [m.text for m in marks] == ["the", "acting", "was", "superb", "awful", "plot"]
    # Nothing fetched: no stylesheet, script, font or image, from anywhere.
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    # The words are reached with the keyboard, each named with its score.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    first = browser.switch_to.active_element
    assert first.text == "the" and re.match(r"^the: [+-]\d\.\d{3}, ", first.get_attribute("aria-label"))
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "explain-report.png"))
