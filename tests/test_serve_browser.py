"""The playground page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, via Selenium).

Skipped, with the reason, where no Chromium or driver is installed (``make test`` installs them with
apt when it can). A screenshot is saved to tests/artifacts/playground.png for a person to look at.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import find_chromium
from tests.test_serve import KEY, LABELS, UvicornThread, settings_for
from tuneforge.serve.app import create_app

torch.set_num_threads(1)

ARTIFACTS = Path(__file__).parent / "artifacts"
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
FOUND = find_chromium()
pytestmark = pytest.mark.skipif(
    FOUND is None,
    reason="no headless Chromium found: install Debian's chromium and chromium-driver (make test does so as root)",
)


@pytest.fixture(scope="module")
def tiny_run(trained_tiny_run: Path) -> Path:
    return trained_tiny_run


def _serve(tiny_run: Path, **overrides: Any) -> UvicornThread:
    return UvicornThread(create_app(settings_for(tiny_run, max_wait_ms=1, **overrides)))


def _wait(browser: Any, condition: Any, timeout: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def test_playground_classifies_with_the_keyboard(browser: Any, tiny_run: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with _serve(tiny_run) as server:
        server.wait_ready()
        browser.get(server.url + "/")
        assert browser.title == "tuneforge playground"
        _wait(browser, lambda b: "labels, version" in b.find_element(By.ID, "status").text)
        assert "3 labels" in browser.find_element(By.ID, "status").text

        # Every form control has a label, and focus starts in the text box.
        unlabelled = browser.execute_script(
            "return [...document.querySelectorAll('input, textarea, select')]"
            ".filter(e => e.labels.length === 0).map(e => e.id)"
        )
        assert unlabelled == []
        active = browser.switch_to.active_element
        assert active.get_attribute("id") == "text"

        # Focus order: text, labels to show, one-per-line, API key, the button.
        order = [active.get_attribute("id")]
        for _ in range(4):
            browser.switch_to.active_element.send_keys(Keys.TAB)
            order.append(browser.switch_to.active_element.get_attribute("id"))
        assert order == ["text", "top-k", "per-line", "api-key", "submit"]

        text_box = browser.find_element(By.ID, "text")
        text_box.click()
        text_box.send_keys("the acting was superb and lovely")
        text_box.send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter submits from the text box
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#results .prediction"))

        top = browser.find_element(By.CSS_SELECTOR, "#results .top").text
        assert top in LABELS
        meters = browser.find_elements(By.CSS_SELECTOR, "#results [role=meter]")
        assert len(meters) == 3  # the default top-k
        values = [float(m.get_attribute("aria-valuenow")) for m in meters]
        assert values == sorted(values, reverse=True) and 99.0 <= sum(values) <= 101.0
        assert meters[0].get_attribute("aria-label") == top
        latency = browser.find_element(By.ID, "latency").text
        assert latency.startswith("Answered in ") and " ms (server " in latency
        assert browser.find_element(By.ID, "error").text == ""

        # Several texts, one per line, with top-k 2.
        top_k = browser.find_element(By.ID, "top-k")
        top_k.clear()
        top_k.send_keys("2")
        browser.find_element(By.ID, "per-line").send_keys(Keys.SPACE)
        text_box.clear()
        text_box.send_keys("great film\nawful plot")
        text_box.send_keys(Keys.CONTROL, Keys.ENTER)
        _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .prediction")) == 2)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results [role=meter]")) == 4
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .prediction .text")]
        assert shown == ["great film", "awful plot"]

        # Nothing was loaded from another origin: the page is self-contained.
        foreign = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => !n.startsWith(location.origin))"
        )
        assert foreign == []

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "playground.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 5_000


def test_playground_shows_errors_and_uses_the_api_key(browser: Any, tiny_run: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # --public-docs: with a key, the page itself is served only when the user opens it up.
    with _serve(tiny_run, api_key=KEY, public_docs=True, max_chars=20) as server:
        server.wait_ready()
        browser.get(server.url + "/")
        _wait(browser, lambda b: "needs an API key" in b.find_element(By.ID, "status").text)
        text_box = browser.find_element(By.ID, "text")
        text_box.send_keys("lovely")
        browser.find_element(By.ID, "submit").click()
        _wait(browser, lambda b: "API key" in b.find_element(By.ID, "error").text)

        browser.find_element(By.ID, "api-key").send_keys(KEY)
        text_box.send_keys(Keys.CONTROL, Keys.ENTER)
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#results .prediction"))
        assert browser.find_element(By.ID, "error").text == ""

        text_box.send_keys(" and far too long for the limit")
        text_box.send_keys(Keys.CONTROL, Keys.ENTER)
        _wait(browser, lambda b: "the limit is 20 per text" in b.find_element(By.ID, "error").text)
        assert re.search(r"'text' has \d+ characters", browser.find_element(By.ID, "error").text)

        browser.find_element(By.ID, "text").clear()
        browser.find_element(By.ID, "submit").click()
        _wait(browser, lambda b: "Type or paste a text first" in b.find_element(By.ID, "error").text)
        assert browser.switch_to.active_element.get_attribute("id") == "text"
        assert browser.find_elements(By.CSS_SELECTOR, "#results .prediction") == [], "no stale result beside an error"
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground-error.png"))


def test_api_docs_render_offline(browser: Any, tiny_run: Path) -> None:
    from selenium.webdriver.common.by import By

    with _serve(tiny_run, api_key=KEY, public_docs=True) as server:
        browser.get(server.url + "/docs")
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/classify", "/v1/model", "/health", "/ready", "/metrics"} <= paths
        assert browser.find_elements(By.CSS_SELECTOR, ".btn.authorize"), "the API key can be entered in the docs"
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(name.startswith(server.url) for name in loaded), loaded
