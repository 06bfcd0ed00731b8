"""Request and response bodies of the HTTP API (they also make the OpenAPI schema at /docs).

The request's limits depend on the server's settings, so each app makes its own request model
(:func:`classify_request_model`): the published schema then states exactly what the server accepts,
limits and the one-of rule included, and a request that the schema allows is never refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

# In the schema, a text must contain a non-whitespace character; Python's \S is exactly the
# complement of what str.strip() removes, so the schema and check_text agree on every character.
NON_BLANK = r"\S"


def check_text(value: str) -> str:
    """A text the model can take: not blank, and valid Unicode (no lone surrogate such as \\ud800)."""
    if not value.strip():
        raise ValueError("empty text (only whitespace)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON can spell half of a surrogate pair alone; the tokenizer cannot take it.
        code = ord(value[exc.start])
        raise ValueError(f"lone surrogate U+{code:04X} at character {exc.start}: not valid Unicode") from None
    return value


def _publish_rules(schema: dict[str, Any]) -> None:
    # The null branch pydantic adds for "absent" is not something to send; one of the two is required.
    properties = schema.get("properties", {})
    for name in ("text", "texts"):
        prop = properties.get(name, {})
        branches = [branch for branch in prop.pop("anyOf", []) if branch.get("type") != "null"]
        if branches:
            prop.update(branches[0])
        prop.pop("default", None)
    schema["oneOf"] = [{"required": ["text"]}, {"required": ["texts"]}]
    schema["examples"] = [{"text": "where is my parcel?", "top_k": 3}, {"texts": ["great", "awful"]}]


class ClassifyRequest(BaseModel):
    """One text (``text``) or several (``texts``); exactly one of the two."""

    # strict: "3" is not a top_k and 5 is not a text; forbid: a misspelt key ("txt") is an error,
    # not a silently empty request.
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra=_publish_rules,
    )

    text: str | None = Field(default=None, description="a single text")
    texts: list[str] | None = Field(default=None, description="several texts, answered in order")
    top_k: int = Field(default=1, ge=1, description="how many labels to return per text (capped at the label count)")

    @field_validator("text", "texts", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # the schema says string/array; "absent" is spelt by leaving the key out
            raise ValueError("null is not allowed: leave the key out instead")
        return value

    @field_validator("top_k", mode="before")
    @classmethod
    def _integral_number(cls, value: object) -> object:
        # JSON Schema counts 3.0 as an integer, so the schema allows it; "3" and true stay errors.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @model_validator(mode="after")
    def _one_of_text_or_texts(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        return self

    def as_list(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


def classify_request_model(*, max_texts: int, max_chars: int) -> type[ClassifyRequest]:
    """:class:`ClassifyRequest` with these limits in its validation and in its JSON schema.

    The limits are checked as the body is validated, so a body with a million numbers in ``texts``
    costs one "too long" error, not a million "not a string" errors.
    """
    text_schema = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": NON_BLANK}
    text = Annotated[
        str, StringConstraints(max_length=max_chars), AfterValidator(check_text), WithJsonSchema(text_schema)
    ]
    texts = Annotated[list[text], Field(min_length=1, max_length=max_texts)]  # type: ignore[valid-type]
    fields = ClassifyRequest.model_fields
    model: type[ClassifyRequest] = create_model(
        "ClassifyRequest",
        __base__=ClassifyRequest,
        text=(text | None, Field(default=None, description=fields["text"].description)),
        texts=(texts | None, Field(default=None, description=fields["texts"].description)),
    )
    return model


def _publish_explain_rules(schema: dict[str, Any]) -> None:
    # "label" is absent or a string, never null (as "text" in a classification request).
    prop = schema.get("properties", {}).get("label", {})
    branches = [branch for branch in prop.pop("anyOf", []) if branch.get("type") != "null"]
    if branches:
        prop.update(branches[0])
    prop.pop("default", None)
    schema["examples"] = [{"text": "where is my parcel?"}, {"text": "great film", "label": "happy"}]


class ExplainRequest(BaseModel):
    """One text to explain, and optionally the label to explain (default: the model's best trained label)."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_publish_explain_rules)

    text: str = Field(description="the text; its words are scored as typed (whitespace-separated; CJK: per character)")
    label: str | None = Field(
        default=None,
        description="a trained label to explain (one of GET /v1/model's labels; another is refused with 422); "
        "default: the model's most probable trained label",
    )
    method: Literal["occlusion"] = Field(
        default="occlusion",
        description="occlusion: each word's score is p(label | text) - p(label | text without it); the only method "
        "the server runs (it works on every model form; integrated gradients: `tuneforge explain --method ig`)",
    )

    @field_validator("label", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("null is not allowed: leave the key out instead")
        return value


def explain_request_model(*, max_chars: int) -> type[ExplainRequest]:
    """:class:`ExplainRequest` with the classification's per-text limit (no truncation: every word is scored)."""
    text_schema = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": NON_BLANK}
    text = Annotated[
        str, StringConstraints(max_length=max_chars), AfterValidator(check_text), WithJsonSchema(text_schema)
    ]
    model: type[ExplainRequest] = create_model(
        "ExplainRequest",
        __base__=ExplainRequest,
        text=(text, Field(description=ExplainRequest.model_fields["text"].description)),
    )
    return model


class WordScore(BaseModel):
    word: str = Field(description="the word as typed")
    start: int = Field(description="its first character's offset in the text")
    end: int = Field(description="the offset after its last character")
    score: float = Field(description="how much it raised the label's probability (negative: lowered it)")


class ExplainResponse(BaseModel):
    request_id: str
    label: str = Field(description="the label explained")
    probability: float = Field(description="the model's probability for it, given the whole text")
    method: Literal["occlusion"]
    words: list[WordScore]
    model_version: str
    latency_ms: float = Field(description="time spent in the server, waiting for a turn included")


class LabelScore(BaseModel):
    label: str
    probability: float


Decision = Literal["in_scope", "out_of_scope", "ambiguous"]
# The answer's fields that only a run with an out-of-scope detector (RUN/intent/) sends.
OPEN_SET_FIELDS = ("decision", "score", "candidates")


def _open_set_fields_are_absent_not_null(schema: dict[str, Any]) -> None:
    # Without a detector these keys are left out, never sent as null: publish them as optional, non-null.
    for name in OPEN_SET_FIELDS:
        prop = schema.get("properties", {}).get(name, {})
        branches = [branch for branch in prop.pop("anyOf", []) if branch.get("type") != "null"]
        if branches:
            prop.update(branches[0])
        prop.pop("default", None)


class ClassifyResult(BaseModel):
    """One text's answer. ``decision``, ``score`` and ``candidates`` are present only when the run has an
    out-of-scope detector; without one the keys are absent (never null) and the answer is closed-set."""

    model_config = ConfigDict(json_schema_extra=_open_set_fields_are_absent_not_null)

    label: str = Field(
        description="the best label; with a detector, the detector's out-of-scope label (e.g. 'oos') when the "
        "decision is out_of_scope, and possibly an intent added from examples"
    )
    probability: float = Field(description="the model's probability for its best intent")
    top_k: list[LabelScore] = Field(description="the trained labels with the highest probabilities, best first")
    truncated: bool = Field(description="the text was longer than the server's limit and was cut")
    decision: Decision | None = Field(
        default=None,
        description="only with an out-of-scope detector: in_scope (answer with 'label'), out_of_scope (none of "
        "the intents: 'label' is the out-of-scope label) or ambiguous (the best two intents are too close: "
        "ask which of 'candidates' was meant)",
    )
    score: float | None = Field(
        default=None,
        description="only with an out-of-scope detector: its in-scope score (higher is more like the training "
        "intents; in scope from the detector's threshold on; the scale depends on the method)",
    )
    candidates: list[LabelScore] | None = Field(
        default=None,
        description="only with an out-of-scope detector: the intents to offer, best first: the best two when "
        "in_scope or ambiguous, the nearest one when out_of_scope",
    )


class ClassifyResponse(BaseModel):
    request_id: str
    predictions: list[ClassifyResult]
    model_version: str
    latency_ms: float = Field(description="time spent in the server, queueing and batching included")


class ErrorResponse(BaseModel):
    detail: str | list[dict]
    request_id: str


class DetectorInfo(BaseModel):
    method: str = Field(description="how texts are scored: msp, energy, mahalanobis or knn")
    oos_label: str = Field(description="the label answered for out-of-scope texts")
    threshold: float = Field(description="the in-scope score from which a text is in scope")
    ambiguity_margin: float = Field(
        description="the best two intents' probabilities closer than this make the answer ambiguous"
    )
    added_intents: list[str] = Field(description="intents added from examples, beyond the trained labels")


class ModelInfo(BaseModel):
    labels: list[str]
    num_labels: int
    form: str = Field(description="how the model runs: model (PyTorch), adapter, or onnx")
    variant: str | None = Field(description="optimized variant name (e.g. onnx-int8), if any")
    quantize: str | None
    base_model: str | None
    max_length: int | None
    version: str = Field(description="content hash of the run directory's metadata")
    run_dir: str
    tuneforge_version: str
    limits: dict[str, int | float | bool]
    detector: DetectorInfo | None = Field(
        default=None,
        description="the run's out-of-scope detector (RUN/intent/); null when it has none (closed-set answers)",
    )
