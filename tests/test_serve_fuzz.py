"""A fuzzer against the server's own published schema (/openapi.json), with the tiny trained model.

Schemathesis generates requests the schema allows and requests it forbids, for every operation, and
checks each answer: never a server error, every response as documented (status, content type,
body schema), a request the schema allows is accepted and one it forbids is refused. The number of
examples per operation is bounded, so that this stays a few seconds of the suite.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans

from tests.test_serve import LABELS, settings_for
from tuneforge.serve.app import create_app

# Examples per operation and mode: the bodies of /v1/classify and /v1/explain are where the rules are, so
# they get more (and they alone have anything to get wrong: the others take no parameters, so no negative
# examples).
OPERATIONS = {
    ("POST", "/v1/classify"): 50,
    ("POST", "/v1/explain"): 30,
    ("GET", "/v1/model"): 5,
    ("GET", "/health"): 5,
    ("GET", "/ready"): 5,
    ("GET", "/metrics"): 5,
}


@pytest.fixture()
def api_schema(trained_tiny_run: Path) -> Iterator[Any]:
    # Small limits, so that the fuzzer reaches them; the real model, so that any text it makes up
    # goes through the real tokenizer.
    app = create_app(settings_for(trained_tiny_run, max_texts_per_request=4, max_chars=40, max_wait_ms=1))
    # Schemathesis starts the app's lifespan itself and calls the app in process, without a network.
    # Its pytest plugin ends that lifespan after each test, so one test does all the fuzzing.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ready = schema["/ready"]["GET"]
    deadline = time.monotonic() + 60
    while ready.Case().call().status_code != 200:
        assert time.monotonic() < deadline, "the model did not become ready"
        time.sleep(0.05)
    yield schema
    shutdown_lifespans()


def _a_trained_label(case: Any) -> Any:
    # An explanation's label must be one of the model's (a 422 otherwise, which the schema says in words):
    # a made-up one becomes a real one, so that the rest of the request is still fuzzed.
    if isinstance(case.body, dict) and isinstance(case.body.get("label"), str):
        case.body["label"] = LABELS[len(case.body["label"]) % len(LABELS)]
    return case


def fuzz(operation: Any, mode: GenerationMode, examples: int) -> None:
    """``examples`` generated requests to ``operation``, each answer checked against the schema."""
    strategy = operation.as_strategy(mode)
    if mode == GenerationMode.POSITIVE and operation.path == "/v1/explain":
        strategy = strategy.map(_a_trained_label)

    # derandomize: the same examples on every run, so that the suite is reproducible.
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(strategy)
        case.call_and_validate()

    run()


def test_the_api_keeps_to_its_published_schema(api_schema: Any) -> None:
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert published == set(OPERATIONS), "every operation is fuzzed"
    for (method, path), examples in OPERATIONS.items():
        fuzz(api_schema[path][method], GenerationMode.POSITIVE, examples)
    for path in ("/v1/classify", "/v1/explain"):
        fuzz(api_schema[path]["POST"], GenerationMode.NEGATIVE, OPERATIONS[("POST", path)])
