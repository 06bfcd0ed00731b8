"""Request and response bodies of the HTTP API (they also make the OpenAPI schema at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ClassifyRequest(BaseModel):
    """One text (``text``) or several (``texts``); exactly one of the two."""

    # strict: "3" is not a top_k and 5 is not a text; forbid: a misspelt key ("txt") is an error,
    # not a silently empty request.
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={"examples": [{"text": "where is my parcel?", "top_k": 3}, {"texts": ["great", "awful"]}]},
    )

    text: str | None = Field(default=None, description="a single text")
    texts: list[str] | None = Field(default=None, description="several texts, answered in order")
    top_k: int = Field(default=1, ge=1, description="how many labels to return per text (capped at the label count)")

    @model_validator(mode="after")
    def _one_of_text_or_texts(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' is empty")
        for index, value in enumerate(self.as_list()):
            if not value.strip():
                where = "'text'" if self.text is not None else f"'texts'[{index}]"
                raise ValueError(f"{where} is empty")
        return self

    def as_list(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class LabelScore(BaseModel):
    label: str
    probability: float


class ClassifyResult(BaseModel):
    label: str
    probability: float
    top_k: list[LabelScore]
    truncated: bool = Field(description="the text was longer than the server's limit and was cut")


class ClassifyResponse(BaseModel):
    request_id: str
    predictions: list[ClassifyResult]
    model_version: str
    latency_ms: float = Field(description="time spent in the server, queueing and batching included")


class ErrorResponse(BaseModel):
    detail: str | list[dict]
    request_id: str


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
