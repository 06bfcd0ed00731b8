"""The monitor's dashboard in a real headless Chromium, on a store of a few hundred items with alerts: entities
with sparklines, the series with its alerts marked, the alert list, an alert's texts reached with the keyboard,
the words behind one text; a screenshot goes to tests/artifacts/. Skipped, with the reason, where no Chromium
or driver is installed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import torch

from tests.conftest import ARTIFACTS, browser_tests, wait_until
from tests.test_monitor import T0, TINY_ROLES, iso_at, raw_config
from tests.test_serve import UvicornThread
from tuneforge.apps.monitor.config import validate_monitor_config
from tuneforge.apps.monitor.runner import Monitor
from tuneforge.apps.monitor.server import create_monitor_app, monitor_serve_settings
from tuneforge.apps.monitor.sinks import Sinks

torch.set_num_threads(1)

pytestmark = browser_tests()
COMPANIES = {"Acme Corp": ("ACME", 6), "Globex": ("GLBX", 4), "Initech": ("INIT", 3)}  # name: (ticker, items an hour)
HEADLINES = [
    "{name} confirms the date of its earnings call",
    "{name} shares rise after upbeat guidance",
    "{name} misses estimates and cuts its outlook",
    "Analysts see steady demand for {name} products",
    "{name} faces a lawsuit over a product recall",
    "{name} announces a new share buyback",
]
BURST_HOUR, BURST_SIZE = 18, 40
# Volume far above an entity's steady hourly count: only ACME's burst (and the overall series with it) fires.
RULES = [
    {
        "name": "volume-spike",
        "type": "ewma_zscore",
        "field": "volume",
        "z": 3.0,
        "min_history": 4,
        "min_volume": 0,
        "direction": "up",
        "min_std": 1.0,
    }
]


def invented_day() -> list[dict[str, Any]]:
    """A day of invented headlines about three companies, steady each hour, and a burst about Acme at 18:00."""
    rows = []
    for hour in range(24):
        for c, (name, (_, per_hour)) in enumerate(COMPANIES.items()):
            for k in range(per_hour):
                ts = T0 + hour * 3600 + 60 * (k * 9 + c) + 30
                text = HEADLINES[(hour + k) % len(HEADLINES)].format(name=name)
                rows.append({"id": f"{hour}-{c}-{k}", "timestamp": iso_at(ts), "text": text})
    for k in range(BURST_SIZE):
        ts = T0 + BURST_HOUR * 3600 + 20 + 85 * k
        text = f"Acme Corp recalls its flagship product after safety complaints (update {k + 1})"
        rows.append({"id": f"burst-{k}", "timestamp": iso_at(ts), "text": text})
    return sorted(rows, key=lambda row: row["timestamp"])


def test_the_dashboard_shows_entities_series_alerts_and_the_texts_behind_one(
    browser: Any, trained_tiny_run: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    raw = raw_config(
        tmp_path,
        run=trained_tiny_run,
        rules=RULES,
        source={"type": "stdin", "lateness": "0s"},
        entities={"aliases": {name: ticker for name, (ticker, _) in COMPANIES.items()}},
    )
    raw["scoring"] = {"run": str(trained_tiny_run), "labels": TINY_ROLES, "batch_size": 64}
    config = validate_monitor_config(raw)
    app = create_monitor_app(
        config,
        monitor_serve_settings(config, threads=1),
        monitor_factory=lambda c, s: Monitor(c, store=s, sinks=Sinks([])),
    )
    rows = invented_day()
    with UvicornThread(app) as server:
        server.wait_ready()
        for i in range(0, len(rows), 64):
            answer = httpx.post(f"{server.url}/v1/ingest", json={"items": rows[i : i + 64]}, timeout=120)
            assert answer.status_code == 200 and answer.json()["stored"] == len(rows[i : i + 64]), answer.text
        alerts = httpx.get(f"{server.url}/v1/alerts").json()["alerts"]
        assert sorted(a["entity"] for a in alerts) == ["*", "ACME"], alerts

        browser.set_window_size(1280, 1700)
        browser.get(server.url + "/")
        wait_until(
            browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true", timeout=30
        )
        status = browser.find_element(By.ID, "status").text
        assert status.startswith(f"{len(rows)} items \u00b7 3 entities \u00b7 2 alerts"), status

        # Entities, busiest first after all items together, each with its sparkline of the last 24 hours.
        entity_rows = browser.find_elements(By.CSS_SELECTOR, "#entities tbody tr")
        assert [r.get_attribute("data-entity") for r in entity_rows] == ["*", "ACME", "GLBX", "INIT"]
        for row in entity_rows:
            spark = row.find_element(By.CSS_SELECTOR, "svg.sparkline")
            assert spark.find_elements(By.CSS_SELECTOR, "polyline.spark-line"), row.text
            assert len(spark.find_elements(By.CSS_SELECTOR, "rect.vol")) == 24
        assert entity_rows[1].find_element(By.CSS_SELECTOR, ".badge").text == "1"

        # All items' series, its alert marked: a band over the burst hour and a focusable marker.
        assert browser.find_element(By.ID, "series-heading").text == "All items, 1h windows"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#series rect.alert-band")) == 1
        marker = browser.find_element(By.CSS_SELECTOR, "#series g.alert-mark")
        assert marker.get_attribute("tabindex") == "0" and marker.get_attribute("role") == "button"

        # The alert list; ACME's alert opened with the keyboard.
        listed = browser.find_elements(By.CSS_SELECTOR, "#alerts button.alert-item")
        assert len(listed) == 2 and all("18:00 UTC" in b.text for b in listed)
        acme = next(b for b in listed if "ACME" in b.text)
        acme.send_keys(Keys.ENTER)
        wait_until(browser, lambda b: b.find_element(By.ID, "drill").is_displayed(), timeout=30)
        assert browser.switch_to.active_element == browser.find_element(By.ID, "drill-heading")
        assert browser.find_element(By.ID, "drill-heading").text.startswith("ACME: volume-spike, 1h window from")
        texts = browser.find_elements(By.CSS_SELECTOR, "#texts > li")
        assert len(texts) == 20
        assert all("Acme Corp" in t.find_element(By.CSS_SELECTOR, ".text").text for t in texts)
        wait_until(browser, lambda b: b.find_element(By.ID, "series-heading").text == "ACME, 1h windows", timeout=30)

        # The words behind the first text, asked for with the keyboard.
        first = texts[0]
        words = first.find_element(By.CSS_SELECTOR, ".text").text.split()
        why = first.find_element(By.CSS_SELECTOR, "button.why")
        why.send_keys(Keys.ENTER)
        wait_until(browser, lambda b: first.find_elements(By.CSS_SELECTOR, ".explanation mark"), timeout=30)
        marks = first.find_elements(By.CSS_SELECTOR, ".explanation mark")
        assert [m.text for m in marks] == words
        label = re.compile(r"^\S+: [+\u2212]\d\.\d{3}, (for|against|neutral to) (happy|sad|meh)$")
        assert all(label.match(m.get_attribute("aria-label")) for m in marks)

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "monitor-dashboard.png"
        browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
