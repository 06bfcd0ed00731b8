"""Financial sentiment monitoring (tuneforge.apps.monitor): the config, entity matching, sources, idempotent
ingest, window aggregation, each alert rule on hand-made series, the sinks (webhook retries, a stuck webhook
never stalls ingest), bad input, a SIGKILL mid-stream and a restart, follow mode and the CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.fault_injection import run_cli
from tuneforge.apps.monitor.aggregate import Window, series
from tuneforge.apps.monitor.config import (
    CusumRule,
    EwmaZscoreRule,
    MonitorConfig,
    NegativeShareRule,
    load_monitor_config,
    parse_duration,
    validate_monitor_config,
)
from tuneforge.apps.monitor.entities import AliasMatcher, build_matcher, read_alias_file, split_entities
from tuneforge.apps.monitor.items import OVERALL, BadItem, Item, Record, content_id, parse_timestamp
from tuneforge.apps.monitor.replay import replay
from tuneforge.apps.monitor.rules import run_rule
from tuneforge.apps.monitor.runner import Monitor
from tuneforge.apps.monitor.score import label_roles
from tuneforge.apps.monitor.sinks import JsonlSink, Sinks, WebhookSink
from tuneforge.apps.monitor.sources import FileSource, stdin_records
from tuneforge.apps.monitor.store import Alert, ScoredItem, Store
from tuneforge.cli import main
from tuneforge.errors import ConfigError

T0 = datetime(2025, 3, 3, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC
HOUR = 3600.0
TINY_ROLES = {"happy": "positive", "sad": "negative", "meh": "neutral"}


# ---- helpers ---------------------------------------------------------------------------------------------


class KeywordScorer:
    """A scorer whose answers a test controls: 'good' is positive, 'bad' negative, anything else neutral."""

    def identity(self) -> dict[str, Any]:
        return {"scorer": "keywords"}

    def score(self, items: Sequence[Item]) -> list[ScoredItem]:
        out = []
        for item in items:
            if "bad" in item.text:
                out.append(ScoredItem(item, "negative", 0.9, 0.05, 0.9, "negative"))
            elif "good" in item.text:
                out.append(ScoredItem(item, "positive", 0.8, 0.8, 0.1, "positive"))
            else:
                out.append(ScoredItem(item, "neutral", 0.6, 0.2, 0.2, "neutral"))
        return out


def raw_config(tmp_path: Path, run: Path | str = "unused-run", **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "scoring": {"run": str(run), "labels": TINY_ROLES, "batch_size": 4},
        "store": {"path": str(tmp_path / "monitor.sqlite")},
        "source": {"type": "file", "path": str(tmp_path / "news.jsonl")},
        "windows": ["1h", "1d"],
        "cooldown": "0s",
        "sinks": {"stdout": False},
    }
    raw.update(sections)
    return raw


def config_of(tmp_path: Path, **sections: Any) -> MonitorConfig:
    return validate_monitor_config(raw_config(tmp_path, **sections))


def record(i: int | str, ts: float | str | None, text: str, entities: list[str] | None = None) -> Record:
    fields: dict[str, Any] = {"id": str(i), "text": text}
    if ts is not None:
        fields["timestamp"] = ts
    if entities is not None:
        fields["entities"] = entities
    return Record(fields, f"test:{i}")


def keyword_monitor(tmp_path: Path, **sections: Any) -> Monitor:
    return Monitor(config_of(tmp_path, **sections), scorer=KeywordScorer(), sinks=Sinks([]))


def window(start_hour: int, volume: int, *, negative: float | None = None, signed: float | None = None) -> Window:
    """A hand-made hourly window of entity ACME."""
    start = T0 + start_hour * HOUR
    if volume == 0:
        return Window("ACME", start, start + HOUR, 0, None, None, None, None)
    return Window("ACME", start, start + HOUR, volume, negative, None, signed, signed)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def iso_at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


# ---- config ----------------------------------------------------------------------------------------------


def test_the_example_config_validates() -> None:
    folder = Path(__file__).parents[1] / "src" / "tuneforge" / "apps" / "monitor" / "example"
    config = load_monitor_config(folder / "monitor.yaml")
    assert [rule.type for rule in config.rules] == ["negative_share", "ewma_zscore", "cusum"]
    assert config.source.path == folder / "news.jsonl" and config.entities.alias_file == folder / "aliases.csv"
    assert read_alias_file(config.entities.alias_file)["Corvid Pharma"] == "CRVD"
    lines = (folder / "news.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) > 200 and all(json.loads(line)["timestamp"] for line in lines)


def test_a_rule_naming_a_missing_field_is_an_error_naming_the_rule(tmp_path: Path) -> None:
    rules = [
        {"type": "negative_share", "threshold": 0.5},
        {"name": "acme-drop", "type": "ewma_zscore", "field": "sentimnet"},
    ]
    with pytest.raises(ConfigError, match=r"rules\[1\] \(acme-drop\)\.field: 'sentimnet' is not an aggregate field"):
        config_of(tmp_path, rules=rules)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": {"type": "file", "path": "x.jsonl", "timezone": "Mars/Olympus"}}, r"source\.timezone: unknown"),
        ({"rules": [{"type": "cusum", "window": "2h"}]}, r"rules\[0\]\.window: '2h' is not one of windows"),
        ({"rules": [{"type": "cusum", "h": -1}]}, r"rules\[0\]\.h: Input should be greater than 0"),
        ({"rules": [{"type": "zigzag"}]}, r"rules\[0\]\.type: must be one of"),
        ({"rules": [{"type": "negative_share"}]}, r"rules\[0\]\.threshold: required key is missing"),
        ({"rules": [{"type": "cusum", "speed": 2}]}, r"rules\[0\]\.speed: unknown key"),
        ({"windows": ["1h", "60m"]}, "the same window twice"),
        ({"windows": ["hourly"]}, "not a duration"),
        ({"source": {"type": "file"}}, "source.path: required"),
        ({"source": {"type": "stdin", "out_of_order": "reject", "lateness": "5m"}}, "only with out_of_order accept"),
        ({"sinks": {"webhook": {"url": "ftp://x"}}}, r"sinks\.webhook\.url: not an http"),
        ({"scoring": {"run": "r", "labels": {"up": "positive"}}}, "no label has the role negative"),
        ({"scoring": {"run": "r", "chunk_size": 0}}, r"scoring\.chunk_size: Input should be greater than or equal"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_of(tmp_path, **change)


def test_rules_get_default_names_and_windows_and_duplicate_names_are_refused(tmp_path: Path) -> None:
    config = config_of(tmp_path, rules=[{"type": "cusum"}, {"type": "negative_share", "threshold": 0.5}])
    assert [rule.name for rule in config.rules] == ["cusum:mean_signed:1h", "negative_share:negative_share:1h"]
    with pytest.raises(ConfigError, match=r"rules\[1\]\.name: 'cusum:mean_signed:1h' is also rules\[0\]"):
        config_of(tmp_path, rules=[{"type": "cusum"}, {"type": "cusum"}])


def test_yaml_paths_are_relative_to_the_file_and_set_overrides_apply(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "m.yaml"
    path.write_text(yaml.safe_dump({"scoring": {"run": "runs/x"}, "store": {"path": "m.sqlite"}}), encoding="utf-8")
    config = load_monitor_config(path, ["source.type=stdin", "cooldown=1h"])
    assert config.scoring.run == tmp_path / "conf" / "runs" / "x"
    assert config.store.path == tmp_path / "conf" / "m.sqlite"
    assert config.source.type == "stdin" and config.cooldown_seconds == 3600
    with pytest.raises(ConfigError, match=r"m\.yaml: windows"):
        load_monitor_config(path, ["windows=[]"])
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    path.write_text("- scoring\n- store\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"m\.yaml: the monitor config must be a mapping of sections \(scoring"):
        load_monitor_config(path)


def test_label_roles_are_checked_against_the_run_labels(tmp_path: Path) -> None:
    labels = ["happy", "sad", "meh"]
    assert label_roles(labels, TINY_ROLES, tmp_path) == TINY_ROLES
    assert label_roles(["Negative", "Positive"], None, tmp_path) == {"Negative": "negative", "Positive": "positive"}
    with pytest.raises(ConfigError, match="not positive/negative/neutral; give each its role"):
        label_roles(labels, None, tmp_path)
    with pytest.raises(ConfigError, match="'glad' not a label of"):
        label_roles(labels, {**TINY_ROLES, "glad": "positive"}, tmp_path)
    with pytest.raises(ConfigError, match="label\\(s\\) 'meh' have no role"):
        label_roles(labels, {"happy": "positive", "sad": "negative"}, tmp_path)


# ---- entities --------------------------------------------------------------------------------------------


def test_alias_matching_word_boundaries_longest_first_and_case_rules() -> None:
    matcher = AliasMatcher({"Acme": "ACME", "Acme Bank": "ACMB", "ACME": "ACME", "ON": "ONSM", "Globex": "GLBX"})
    assert matcher.find("Acme Bank raises rates; acme shares flat") == ["ACMB", "ACME"]
    assert matcher.find("Acmeville and Globexia are towns") == []  # word boundaries
    assert matcher.find("rumours on the wire") == []  # a ticker in capitals only matches as written
    assert matcher.find("ON semis up; $ACME (ACME) down") == ["ONSM", "ACME"]
    assert matcher.find("ACME BANK\nand  acme   bank") == ["ACMB"]  # names in any case, any whitespace
    assert AliasMatcher({"on": "ONSM"}, case_sensitive=False).find("ON and on") == ["ONSM"]
    assert AliasMatcher({"Acme": "ACME"}, case_sensitive=True).find("acme") == []
    with pytest.raises(ConfigError, match="names two entities"):
        AliasMatcher({"Acme": "ACME", "acme": "OTHER"})


def test_alias_files_and_entity_columns(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("alias,entity\nAcme Corp,ACME\nGlobex,GLBX\n", encoding="utf-8")
    (tmp_path / "a.yaml").write_text("ACME: [Acme Corp, Acme]\nGlobex: GLBX\n", encoding="utf-8")
    assert read_alias_file(tmp_path / "a.csv") == {"Acme Corp": "ACME", "Globex": "GLBX"}
    assert read_alias_file(tmp_path / "a.yaml") == {"Acme Corp": "ACME", "Acme": "ACME", "Globex": "GLBX"}
    matcher = build_matcher({"Initech": "INIT"}, tmp_path / "a.csv")
    assert matcher.find("Initech and GLBX and Acme Corp") == ["INIT", "GLBX", "ACME"]  # tickers match too
    assert [matcher.resolve(name) for name in ("acme  corp", "GLBX", "Hooli")] == ["ACME", "GLBX", "Hooli"]
    assert split_entities("ACME; GLBX|INIT, ACME") == ["ACME", "GLBX", "INIT"]
    assert split_entities('["ACME", "GLBX"]') == ["ACME", "GLBX"] and split_entities(None) == []
    with pytest.raises(ConfigError, match="file not found"):
        read_alias_file(tmp_path / "missing.csv")


# ---- items and sources -----------------------------------------------------------------------------------


def test_timestamps_in_any_zone_and_missing_ones() -> None:
    new_york = ZoneInfo("America/New_York")
    assert parse_timestamp("2025-03-03T00:00:00Z", new_york) == T0
    assert parse_timestamp("2025-03-03T01:00:00+01:00", new_york) == T0
    assert parse_timestamp("2025-03-02 19:00", new_york) == T0  # naive: the source's zone (EST, UTC-5)
    assert parse_timestamp(T0, new_york) == T0 and parse_timestamp(str(int(T0)), new_york) == T0
    for bad, message in ((None, "no timestamp"), ("", "no timestamp"), ("soon", "not ISO 8601"), (-5, "range")):
        with pytest.raises(BadItem, match=message):
            parse_timestamp(bad, new_york)
    assert content_id(T0, "x") == content_id(T0, "x") != content_id(T0 + 1, "x")


def test_file_source_resumes_from_an_offset_and_reads_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "news.csv"
    path.write_bytes(
        b'\xef\xbb\xbfid,timestamp,text\n1,2025-03-03T00:00:00Z,"first line\nsecond, line"\n\n'
        b"2,2025-03-03T01:00:00Z,plain\n3,2025-03-03T02:00:00Z,no newline at the end"
    )
    records = [r for r in FileSource(path, "csv").read(0) if not r.blank]
    assert [r.fields["text"] for r in records] == ["first line\nsecond, line", "plain", "no newline at the end"]
    assert records[-1].offset == path.stat().st_size
    resumed = list(FileSource(path, "csv").read(records[0].offset))
    assert [r.fields["id"] for r in resumed if not r.blank] == ["2", "3"]
    # Followed, a last line without its newline is still being written: it is left for the next look.
    followed = [r for r in FileSource(path, "csv", follow=True).read(0) if not r.blank]
    assert [r.fields["id"] for r in followed] == ["1", "2"]


def test_broken_records_come_with_their_error(tmp_path: Path) -> None:
    path = tmp_path / "news.jsonl"
    path.write_text('{"id": 1}\nnot json\n[1, 2]\n', encoding="utf-8")
    errors = [r.error for r in FileSource(path, "jsonl").read(0)]
    assert errors == [None, "not valid JSON (Expecting value)", "not a JSON object"]


def test_stdin_records_yield_none_when_quiet() -> None:
    read, write = os.pipe()
    with os.fdopen(read, "rb") as stream, os.fdopen(write, "wb") as sink:
        sink.write(b'{"id": "a", "timestamp": 1, "text": "x"}\n')
        sink.flush()
        records = stdin_records(stream, "jsonl", idle_seconds=0.05)
        assert next(records).fields["id"] == "a"
        assert next(records) is None  # quiet: the runner commits what it holds
        sink.write(b'{"id": "b", "timestamp": 2, "text": "y"}\n')
        sink.close()
        rest = list(records)
    assert [r.fields["id"] for r in rest if r is not None] == ["b"]


# ---- ingest: idempotent, bad input, out of order ---------------------------------------------------------


def test_ingest_is_idempotent_by_id_and_by_content(tmp_path: Path) -> None:
    monitor = keyword_monitor(tmp_path, entities={"aliases": {"Acme": "ACME"}})
    batch = [
        record("a", T0, "Acme looks good", ["GLBX"]),
        record("b", T0 + 60, "bad day for Acme"),
        Record({"timestamp": T0 + 120, "text": "no id, hashed"}, "x:3"),
    ]
    first = monitor.ingest(batch)
    again = monitor.ingest([*batch, record("a", T0 + 180, "same id, other text")])
    assert (first.stored, first.duplicates, again.stored, again.duplicates) == (3, 0, 0, 4)
    store = monitor.store
    assert store.item_count() == 3
    assert [e.entity for e in store.entities()] == ["ACME", "GLBX"]
    [item] = store.items(entity="GLBX")
    assert item.id == "a" and item.entities == ("GLBX", "ACME") and item.sentiment == "positive"
    assert item.signed == pytest.approx(0.7)
    monitor.close()


def test_bad_items_are_rejected_with_their_reason_and_kept(tmp_path: Path) -> None:
    monitor = keyword_monitor(tmp_path, source={"type": "stdin", "out_of_order": "reject"})
    report = monitor.ingest(
        [
            record(1, T0 + HOUR, "fine"),
            record(2, None, "no time"),
            record(3, "yesterday-ish", "bad time"),
            record(4, T0, "an hour too late"),
            record(5, T0 + HOUR, ""),
            Record({}, "x:6", error="not valid JSON (Expecting value)"),
            record(7, "2999-01-01T00:00:00Z", "a typo'd year would make every later item late"),
        ]
    )
    assert report.stored == 1
    assert dict(report.rejected) == {
        "no timestamp": 1,
        "timestamp is not ISO 8601 or epoch seconds": 1,
        "out of order": 1,
        "no text": 1,
        "not valid JSON": 1,
        "in the future": 1,
    }
    stats = monitor.store.stats()
    assert stats["items"] == 1 and stats["rejected"] == 6
    locations = {r["location"] for r in monitor.store.rejected()}
    assert locations == {"test:2", "test:3", "test:4", "test:5", "x:6", "test:7"}
    monitor.close()


def test_out_of_order_items_within_the_lateness_are_accepted(tmp_path: Path) -> None:
    monitor = keyword_monitor(tmp_path, source={"type": "stdin", "out_of_order": "accept", "lateness": "30m"})
    report = monitor.ingest(
        [record(1, T0 + HOUR, "x"), record(2, T0 + HOUR - 600, "10 min late"), record(3, T0, "an hour late")]
    )
    assert report.stored == 2 and dict(report.rejected) == {"too late": 1}
    monitor.close()


def test_a_store_refuses_items_scored_by_another_model(tmp_path: Path) -> None:
    keyword_monitor(tmp_path).close()

    class Other(KeywordScorer):
        def identity(self) -> dict[str, Any]:
            return {"scorer": "other"}

    with pytest.raises(ConfigError, match=r"give this config its own store\.path"):
        Monitor(config_of(tmp_path), scorer=Other(), sinks=Sinks([]))


# ---- aggregation -----------------------------------------------------------------------------------------


def test_window_aggregates_per_entity_and_overall(tmp_path: Path) -> None:
    monitor = keyword_monitor(tmp_path, smoothing=0.5)
    monitor.ingest(
        [
            record(1, T0 + 60, "good", ["ACME"]),
            record(2, T0 + 120, "bad", ["ACME"]),
            record(3, T0 + 180, "bad", ["ACME", "GLBX"]),
            record(4, T0 + 240, "meh"),
            record(5, T0 + 2 * HOUR + 60, "good", ["ACME"]),  # hour 1 is empty
        ]
    )
    acme = series(monitor.store, "ACME", HOUR, alpha=0.5)
    assert [(w.start - T0) / HOUR for w in acme] == [0, 1, 2]
    assert [w.volume for w in acme] == [3, 0, 1]
    assert acme[0].negative_share == pytest.approx(2 / 3) and acme[0].positive_share == pytest.approx(1 / 3)
    assert acme[0].mean_signed == pytest.approx((0.7 - 0.85 - 0.85) / 3)
    assert acme[1].mean_signed is None and acme[1].index == acme[0].index  # an empty window keeps the index
    assert acme[2].index == pytest.approx(0.5 * 0.7 + 0.5 * acme[0].index)
    overall = series(monitor.store, OVERALL, HOUR, alpha=0.5)
    assert [w.volume for w in overall] == [4, 0, 1]
    [day] = series(monitor.store, "ACME", 86400, alpha=0.5)
    assert day.volume == 4 and day.start == T0
    assert series(monitor.store, "ACME", HOUR, alpha=0.5, start=T0 + 2 * HOUR)[0].index == acme[2].index
    assert series(monitor.store, "NOPE", HOUR, alpha=0.5) == []
    monitor.close()


def test_the_query_api_a_dashboard_reads_beside_a_running_writer(tmp_path: Path) -> None:
    monitor = keyword_monitor(
        tmp_path, rules=RULES, entities={"aliases": {"ACME": "ACME"}}, source={"type": "stdin", "lateness": "0s"}
    )
    monitor.ingest([Record(row, "r") for row in stream_rows()])
    with Store(tmp_path / "monitor.sqlite", readonly=True) as reader:  # its own connection; never blocks ingest
        [acme, glbx] = reader.entities()
        assert (acme.entity, glbx.entity) == ("ACME", "GLBX") and acme.volume > glbx.volume
        assert reader.time_range("ACME") == (acme.first_ts, acme.last_ts)
        negatives = reader.items(entity="ACME", sentiment="negative", order="oldest", limit=3)
        assert len(negatives) == 3 and all(item.sentiment == "negative" for item in negatives)
        assert [i.ts for i in negatives] == sorted(i.ts for i in negatives)
        assert reader.items(limit=2, offset=1)[0].ts <= reader.items(limit=1)[0].ts
        alerts = reader.alerts(limit=1000)
        assert alerts == sorted(alerts, key=lambda a: (-a.window_start, -(a.id or 0)))
        assert reader.alert(alerts[0].id) == alerts[0] and reader.alert(10**6) is None
        assert reader.alerts(entity=OVERALL, rule="vol") == [a for a in alerts if a.entity == "*" and a.rule == "vol"]
        assert alerts[0].to_dict()["window_start_time"].endswith("Z")
        stats = reader.stats()
        assert stats["items"] == monitor.store.item_count() and stats["alerts"] == len(alerts)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.set_state("x", 1)
    monitor.close()


# ---- rules on hand-made series ---------------------------------------------------------------------------


def test_negative_share_rule_needs_the_threshold_and_the_volume() -> None:
    rule = NegativeShareRule(type="negative_share", name="n", threshold=0.6, min_volume=5)
    windows = [window(0, 10, negative=0.5), window(1, 4, negative=0.9), window(2, 5, negative=0.6), window(3, 0)]
    fired = run_rule(rule, windows)
    assert [w.start for w, _ in fired] == [windows[2].start]
    assert fired[0][1].value == pytest.approx(0.6) and "negative share 0.60 >= 0.60 (5 items)" in fired[0][1].message


def test_ewma_zscore_rule_fires_on_a_jump_against_the_entity_baseline() -> None:
    rule = EwmaZscoreRule(type="ewma_zscore", name="z", alpha=0.3, z=3.0, min_history=5, direction="down", min_std=0.05)
    calm = [0.30, 0.32, 0.28, 0.31, 0.29, 0.30, 0.33, 0.27]
    windows = [window(i, 20, signed=v) for i, v in enumerate([*calm, -0.4, 0.29])]
    fired = run_rule(rule, windows)
    assert [w.start for w, _ in fired] == [windows[8].start]
    assert fired[0][1].detail["z"] < -3.0
    # Too little history: the same jump early on is not judged; a rise is not a "down".
    assert run_rule(rule, [window(i, 20, signed=v) for i, v in enumerate([0.3, 0.3, -0.4])]) == []
    assert run_rule(rule, [window(i, 20, signed=v) for i, v in enumerate([*calm, 0.99])]) == []
    both = rule.model_copy(update={"direction": "both"})
    assert len(run_rule(both, [window(i, 20, signed=v) for i, v in enumerate([*calm, 0.99])])) == 1
    # Empty windows are skipped, not read as zeros.
    gappy = [window(i, 20 if i % 2 == 0 else 0, signed=0.3 if i % 2 == 0 else None) for i in range(20)]
    assert run_rule(both, gappy) == []


def test_ewma_zscore_on_volume() -> None:
    rule = EwmaZscoreRule(type="ewma_zscore", name="v", field="volume", z=3.0, min_history=6, min_volume=0)
    volumes = [10, 12, 9, 11, 10, 13, 10, 11, 60, 10]
    windows = [Window("X", T0 + i * HOUR, T0 + (i + 1) * HOUR, v, 0.1, 0.1, 0.0, 0.0) for i, v in enumerate(volumes)]
    assert [w.volume for w, _ in run_rule(rule, windows)] == [60]


def test_cusum_rule_finds_a_sustained_small_shift_the_zscore_misses() -> None:
    baseline = [0.30, 0.34, 0.26, 0.31, 0.29, 0.33, 0.27, 0.30, 0.32, 0.28]  # std ~0.025
    shifted = [0.25] * 8  # ~2 std below: never 3, but it lasts
    windows = [window(i, 20, signed=v) for i, v in enumerate(baseline + shifted)]
    cusum = CusumRule(type="cusum", name="c", k=0.5, h=4.0, min_history=10, direction="down")
    fired = run_rule(cusum, windows)
    assert len(fired) == 1 and fired[0][1].detail["direction"] == "down"
    assert 10 < (fired[0][0].start - T0) / HOUR < 14  # a few windows into the shift
    zscore = EwmaZscoreRule(type="ewma_zscore", name="z", alpha=0.1, z=3.0, min_history=10)
    assert run_rule(zscore, windows) == []
    assert run_rule(cusum, [window(i, 20, signed=v) for i, v in enumerate(baseline * 3)]) == []
    assert run_rule(cusum.model_copy(update={"direction": "up"}), windows) == []


def test_cooldown_keeps_a_rule_quiet_for_an_entity() -> None:
    rule = NegativeShareRule(type="negative_share", name="n", threshold=0.5, min_volume=1)
    windows = [window(i, 5, negative=0.8) for i in range(8)]
    assert len(run_rule(rule, windows, cooldown=0)) == 8
    fired = run_rule(rule, windows, cooldown=3 * HOUR)  # quiet until 3 h after the end of the alerted window
    assert [(w.start - T0) / HOUR for w, _ in fired] == [0, 4]


# ---- live evaluation: windows close as the stream moves on -----------------------------------------------


RULES = [
    {"name": "neg", "type": "negative_share", "threshold": 0.5, "min_volume": 2},
    {"name": "vol", "type": "ewma_zscore", "field": "volume", "z": 1.0, "min_history": 2, "min_volume": 0},
]


def stream_rows(hours: int = 12) -> list[dict[str, Any]]:
    """An invented stream: ACME in every hour, GLBX in some, ACME turning bad in hours 7-9."""
    rows = []
    counts = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    for hour in range(hours):
        for k in range(counts[hour % len(counts)]):
            mood = "bad" if 7 <= hour <= 9 or k % 3 == 2 else "good"
            ts = T0 + hour * HOUR + 60 * (k + 1)
            rows.append({"id": f"{hour}-{k}", "timestamp": iso_at(ts), "text": f"{mood} news {hour} {k} for ACME"})
            if k % 2:
                rows.append({"id": f"{hour}-{k}g", "timestamp": iso_at(ts + 1), "text": "meh", "entities": "GLBX"})
    return rows


def test_live_alerts_equal_the_backtest_whatever_the_batches(tmp_path: Path) -> None:
    rows = stream_rows()
    write_jsonl(tmp_path / "news.jsonl", rows)
    sections = {
        "rules": RULES,
        "entities": {"aliases": {"ACME": "ACME"}},
        "source": {"type": "stdin", "lateness": "0s"},
    }
    monitor = keyword_monitor(tmp_path / "live", **sections)
    for i in range(0, len(rows), 7):  # batches that cut across windows
        monitor.ingest([Record(row, f"row {j}") for j, row in enumerate(rows[i : i + 7], start=i)])
    live = {a.key for a in monitor.store.alerts(limit=1000)}
    # The last hour is still open live (nothing later has come); the backtest closes it at the end.
    result = replay(config_of(tmp_path / "bt", **sections), tmp_path / "news.jsonl", scorer=KeywordScorer())
    backtest = {a.key for a in result.alerts}
    last_hour = T0 + 11 * HOUR
    assert live == {a.key for a in result.alerts if a.window_start < last_hour} and live
    assert any(a.rule == "neg" and a.entity == "ACME" for a in result.alerts)
    assert backtest >= live
    # The alert's texts are there for the analyst: the most negative first.
    alert = next(a for a in monitor.store.alerts(entity="ACME", rule="neg"))
    texts = monitor.store.alert_items(alert.id)
    assert texts and all(t.ts >= alert.window_start and t.ts < alert.window_end for t in texts)
    assert texts[0].sentiment == "negative"
    monitor.close()


class CountingScorer(KeywordScorer):
    """A keyword scorer that remembers how many items each call was given."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, items: Sequence[Item]) -> list[ScoredItem]:
        self.calls.append(len(items))
        return super().score(items)


def test_consume_commits_chunks_of_chunk_size_and_a_quiet_source_at_once(tmp_path: Path) -> None:
    raw = raw_config(tmp_path, source={"type": "stdin", "lateness": "0s"})
    raw["scoring"].update(batch_size=2, chunk_size=5)
    scorer = CountingScorer()
    monitor = Monitor(validate_monitor_config(raw), scorer=scorer, sinks=Sinks([]))
    stream: list[Record | None] = [record(i, T0 + i, "good news") for i in range(12)]
    stream.insert(7, None)  # the source went quiet after 7 records: those are committed, not held for 3 more
    committed: list[int] = []
    report = monitor.consume(stream, on_batch=lambda r: committed.append(monitor.store.stats()["items"]))
    # The scorer gets whole chunks (the model cuts them into batch_size batches), not batches of 2.
    assert scorer.calls == [5, 2, 5] and committed == [5, 7, 12]
    assert report.stored == 12 and report.received == 12
    monitor.close()


def test_sinks_get_each_alert_once_and_jsonl_skips_what_it_has(tmp_path: Path) -> None:
    class Collect:
        def __init__(self) -> None:
            self.alerts: list[Alert] = []

        def send(self, alert: Alert) -> None:
            self.alerts.append(alert)

        def close(self, timeout: float = 10.0) -> None:
            pass

    collect = Collect()
    jsonl = JsonlSink(tmp_path / "alerts.jsonl")
    config = config_of(tmp_path, rules=RULES, source={"type": "stdin", "lateness": "0s"})
    monitor = Monitor(config, scorer=KeywordScorer(), sinks=Sinks([collect, jsonl]))
    rows = [Record(row, "r") for row in stream_rows()]
    monitor.ingest(rows)
    monitor.ingest(rows)  # again: nothing new
    assert collect.alerts and len({a.key for a in collect.alerts}) == len(collect.alerts)
    assert {a.key for a in collect.alerts} == {a.key for a in monitor.store.alerts(limit=1000)}
    jsonl.send(collect.alerts[0])  # handed over again (a restart before it was marked): written once
    lines = (tmp_path / "alerts.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(a.key for a in collect.alerts)
    monitor.close()


# ---- the webhook ----------------------------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.calls.append((body["key"], self.headers["Idempotency-Key"]))  # type: ignore[attr-defined]
        if server.release is not None:  # type: ignore[attr-defined]
            server.release.wait(30)  # type: ignore[attr-defined]
        status = server.statuses.pop(0) if server.statuses else 200  # type: ignore[attr-defined]
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.calls, server.statuses, server.release = [], [], None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    if server.release is not None:  # type: ignore[attr-defined]
        server.release.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def _alert(i: int) -> Alert:
    return Alert(
        "r", "negative_share", "ACME", "1h", T0 + i * HOUR, T0 + (i + 1) * HOUR, "negative_share", 0.9, 0.5, "m"
    )


def _webhook(server: ThreadingHTTPServer, **options: Any) -> WebhookSink:
    from tuneforge.apps.monitor.config import WebhookConfig

    url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    return WebhookSink(WebhookConfig(url=url, backoff=0.01, **options), warn=lambda message: None)


def test_webhook_retries_a_500_with_backoff_then_delivers(receiver: ThreadingHTTPServer) -> None:
    receiver.statuses.extend([500, 503])  # type: ignore[attr-defined]
    sink = _webhook(receiver, retries=3)
    sink.send(_alert(0))
    sink.close(timeout=30)
    assert sink.stats() == {"sent": 1, "failed": 0, "dropped": 0, "retried": 2}
    key = _alert(0).key
    assert receiver.calls == [(key, key)] * 3  # type: ignore[attr-defined]


def test_webhook_gives_up_after_its_retries_and_does_not_retry_a_400(receiver: ThreadingHTTPServer) -> None:
    receiver.statuses.extend([500] * 10)  # type: ignore[attr-defined]
    sink = _webhook(receiver, retries=2)
    sink.send(_alert(0))
    sink.close(timeout=30)
    assert sink.stats() == {"sent": 0, "failed": 1, "dropped": 0, "retried": 2}
    receiver.statuses[:] = [400]  # type: ignore[attr-defined]
    receiver.calls.clear()  # type: ignore[attr-defined]
    sink = _webhook(receiver, retries=5)
    sink.send(_alert(1))
    sink.close(timeout=30)
    assert sink.stats()["failed"] == 1 and len(receiver.calls) == 1  # type: ignore[attr-defined]


def test_webhook_retries_a_timeout_then_gives_up(receiver: ThreadingHTTPServer) -> None:
    receiver.release = threading.Event()  # type: ignore[attr-defined]  # the receiver never answers
    sink = _webhook(receiver, retries=1, timeout=0.2)
    sink.send(_alert(0))
    _wait_for(lambda: sink.pending() == 0)
    assert sink.stats() == {"sent": 0, "failed": 1, "dropped": 0, "retried": 1}
    assert len(receiver.calls) == 2  # type: ignore[attr-defined]
    sink.close(timeout=5)


def test_a_stuck_webhook_never_stalls_ingest(receiver: ThreadingHTTPServer, tmp_path: Path) -> None:
    receiver.release = threading.Event()  # type: ignore[attr-defined]
    sink = _webhook(receiver, retries=1, queue_size=2, timeout=60)
    sink.send(_alert(99))
    _wait_for(lambda: len(receiver.calls) == 1)  # type: ignore[attr-defined]  # its POST now hangs
    config = config_of(tmp_path, rules=RULES, source={"type": "stdin", "lateness": "0s"})
    monitor = Monitor(config, scorer=KeywordScorer(), sinks=Sinks([sink]))
    rows = stream_rows()
    for i in range(0, len(rows), 5):
        monitor.ingest([Record(row, "r") for row in rows[i : i + 5]])
    # Every item is stored, every alert raised, while the webhook is stuck: its queue keeps the newest two.
    assert monitor.store.item_count() == len(rows)
    alerts = monitor.store.alerts(limit=1000)
    assert len(alerts) > 2 and len(receiver.calls) == 1  # type: ignore[attr-defined]
    assert sink.pending() == 3 and sink.dropped == len(alerts) - 2
    receiver.release.set()  # type: ignore[attr-defined]
    monitor.close(timeout=30)
    assert sink.sent == 3 and sink.failed == 0
    newest = {a.key for a in sorted(alerts, key=lambda a: a.id or 0)[-2:]}
    assert {key for key, _ in receiver.calls[1:]} == newest  # type: ignore[attr-defined]


# ---- scoring with a real run ------------------------------------------------------------------------------


def test_scoring_with_the_int8_onnx_variant_stores_calibrated_probabilities(
    trained_tiny_run: Path, tmp_path: Path
) -> None:
    from tuneforge.infer.predictor import Predictor
    from tuneforge.optimize.pipeline import OptimizeOptions, optimize_run

    optimize_run(
        trained_tiny_run, out_dir=tmp_path / "opt", options=OptimizeOptions(variants=("onnx-int8",), threads=1)
    )
    variant = tmp_path / "opt" / "variants" / "onnx-int8"
    raw = raw_config(tmp_path, run=variant, source={"type": "stdin"})
    raw["scoring"]["form"] = "onnx"
    monitor = Monitor(validate_monitor_config(raw), sinks=Sinks([]))
    assert monitor.scorer.predictor.form == "onnx" and monitor.scorer.calibrated
    texts = ["great lovely film", "awful boring plot", "okay average story"]
    monitor.ingest([record(i, T0 + i, text) for i, text in enumerate(texts)])
    stored = {item.text: item for item in monitor.store.items(order="oldest")}
    expected = Predictor(variant, form="onnx", open_set=False).predict_proba(texts)
    labels = monitor.scorer.predictor.labels
    for text, row in zip(texts, expected, strict=True):
        by_label = dict(zip(labels, row, strict=True))
        item = stored[text]
        assert item.probability == pytest.approx(max(row), abs=1e-6)  # the calibrated probability
        assert item.label == max(by_label, key=by_label.__getitem__)
        assert item.signed == pytest.approx(by_label["happy"] - by_label["sad"], abs=1e-6)
    monitor.close()


# ---- kill and restart ------------------------------------------------------------------------------------

_KILLER = """
import os, signal, sys
from tuneforge import cli
from tuneforge.apps.monitor.store import Store

point, count = sys.argv[1], int(sys.argv[2])
calls = [0]

def killing(original):
    # set_offset: killed inside the batch's transaction, the offset written but not committed;
    # mark_dispatched: killed after the sinks took the alerts, before they are marked as taken.
    def wrapper(self, *args, **kwargs):
        if point == "set_offset":
            original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        if point != "set_offset":
            original(self, *args, **kwargs)
    return wrapper

setattr(Store, point, killing(getattr(Store, point)))
sys.exit(cli.main(sys.argv[3:]))
"""


def _killed_at(point: str, count: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _KILLER, point, str(count), *args], capture_output=True, text=True, timeout=300
    )


def _store_contents(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        return {
            "items": conn.execute("SELECT id, ts, text, label, round(signed, 4) FROM items ORDER BY id").fetchall(),
            "entities": conn.execute("SELECT item_id, entity FROM item_entities ORDER BY 1, 2").fetchall(),
            "alerts": conn.execute("SELECT key, round(value, 4) FROM alerts ORDER BY key").fetchall(),
            "rejected": conn.execute("SELECT location, reason FROM rejected ORDER BY 1").fetchall(),
            "undispatched": conn.execute("SELECT COUNT(*) FROM alerts WHERE dispatched = 0").fetchone()[0],
        }
    finally:
        conn.close()


@pytest.mark.parametrize(("point", "count"), [("set_offset", 3), ("mark_dispatched", 2)])
def test_sigkill_mid_stream_and_a_restart_leave_no_duplicate_and_no_gap(
    trained_tiny_run: Path, tmp_path: Path, point: str, count: int
) -> None:
    rows = stream_rows()
    rows.insert(10, {"id": "broken", "text": "no timestamp here"})
    write_jsonl(tmp_path / "news.jsonl", rows)
    raw = raw_config(
        tmp_path,
        run=trained_tiny_run,
        rules=RULES,
        entities={"aliases": {"ACME": "ACME"}},
        source={"type": "file", "path": str(tmp_path / "news.jsonl"), "lateness": "0s"},
        sinks={"stdout": True, "jsonl": str(tmp_path / "alerts.jsonl")},
    )
    raw["scoring"].update(batch_size=4, chunk_size=8)  # a commit every 8 records: the kill lands mid-stream
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    args = ["monitor", "run", str(tmp_path / "monitor.yaml")]

    killed = _killed_at(point, count, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = _store_contents(tmp_path / "monitor.sqlite")
    assert 0 < len(partial["items"]) < len({row["id"] for row in rows}) - 1

    finished = run_cli(args)
    assert finished.returncode == 0, finished.stderr
    after = _store_contents(tmp_path / "monitor.sqlite")

    # The same stream, never interrupted, in-process.
    reference_raw = {**raw, "store": {"path": str(tmp_path / "reference.sqlite")}, "sinks": {"stdout": False}}
    config = validate_monitor_config(reference_raw)
    from tuneforge.apps.monitor.runner import open_source

    with Monitor(config) as monitor:
        records, source = open_source(config, monitor.store)
        monitor.consume(records, source=source)
    reference = _store_contents(tmp_path / "reference.sqlite")

    assert after == reference  # no duplicate, no gap: every item, entity, alert and rejection exactly once
    assert len(after["items"]) == len(rows) - 1 and after["rejected"] == [
        ("news.jsonl:11", "no timestamp (column 'timestamp')")
    ]
    assert after["undispatched"] == 0 and after["alerts"]
    keys = [json.loads(line)["key"] for line in (tmp_path / "alerts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(keys) == sorted(key for key, _ in after["alerts"])  # each alert in the sink exactly once


# ---- follow mode and the CLI -----------------------------------------------------------------------------


def _wait_for(condition: Any, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _count(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        with Store(path, readonly=True) as store:
            return store.item_count()
    except Exception:
        return 0


def test_follow_reads_a_growing_file_like_tail_f_and_stops_cleanly(trained_tiny_run: Path, tmp_path: Path) -> None:
    news = tmp_path / "news.jsonl"
    rows = stream_rows(4)
    write_jsonl(news, rows[:5])
    raw = raw_config(tmp_path, run=trained_tiny_run, source={"type": "follow", "path": str(news), "poll_interval": 0.1})
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "monitor", "run", str(tmp_path / "monitor.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        store = tmp_path / "monitor.sqlite"
        _wait_for(lambda: _count(store) == 5)
        with news.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(rows[5]) + "\n" + json.dumps(rows[6])[:20])  # the second still being written
            handle.flush()
            _wait_for(lambda: _count(store) == 6)
            handle.write(json.dumps(rows[6])[20:] + "\n")
        _wait_for(lambda: _count(store) == 7)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped: 7 records: 7 stored" in stderr


def test_replay_cli_prints_the_alert_table_and_writes_plots(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "news.jsonl", list(reversed(stream_rows())))  # replay sorts by time
    raw = raw_config(tmp_path, run=trained_tiny_run, rules=RULES, entities={"aliases": {"ACME": "ACME"}})
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_cli(["monitor", "replay", str(tmp_path / "monitor.yaml"), "--data", str(tmp_path / "news.jsonl")])
    assert result.returncode == 0, result.stderr
    assert "alerts in news.jsonl" in result.stdout and "vol" in result.stdout
    replay_store = tmp_path / "monitor-replay.sqlite"
    assert replay_store.is_file() and not (tmp_path / "monitor.sqlite").exists()
    plots = sorted((tmp_path / "monitor-replay-plots").glob("*.png"))
    assert plots and all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
    assert "rejected" not in result.stderr.split("done:")[-1]
    # monitor serve checks its options before it starts (its HTTP side: tests/test_monitor_serve.py).
    assert main(["monitor", "serve", str(tmp_path / "monitor.yaml"), "--port", "70000"]) == 2
    assert "--port: must be in 0..65535" in capsys.readouterr().err


def test_run_cli_reads_csv_from_stdin_and_prints_alerts(
    trained_tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "timestamp", "text", "entities"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({"entities": "", **row} for row in stream_rows())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(buffer.getvalue().encode("utf-8"))))
    raw = raw_config(
        tmp_path,
        run=trained_tiny_run,
        rules=RULES,
        source={"type": "stdin", "format": "csv"},
        sinks={"stdout": True, "jsonl": str(tmp_path / "alerts.jsonl")},
    )
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["monitor", "run", str(tmp_path / "monitor.yaml")]) == 0
    out, err = capsys.readouterr()
    rows = stream_rows()
    assert f"done: {len(rows)} records: {len(rows)} stored" in err
    with Store(tmp_path / "monitor.sqlite", readonly=True) as store:
        assert store.item_count() == len(rows)
        alerts = store.alerts(limit=1000)
        assert store.stats()["offsets"] == {}  # stdin cannot be resumed: ids alone keep items single
    assert alerts and out.count("ALERT [") == len(alerts)
