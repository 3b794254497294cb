"""Wire types: TGI's request and response shapes, field for field.

Range rules that TGI checks in its router (temperature > 0, 0 < top_p < 1, ...) live in `server.validation`, so they
produce TGI's own messages instead of pydantic's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.load.adapters import AdapterInfo


def _range(
    min: float | None = None, max: float | None = None, above: float | None = None, below: float | None = None
) -> dict[str, Any]:
    """The bounds `server.validation` enforces, stated in the OpenAPI schema only, so the errors stay TGI's own."""
    bounds = {"minimum": min, "maximum": max, "exclusiveMinimum": above, "exclusiveMaximum": below}
    return {k: v for k, v in bounds.items() if v is not None}


class Parameters(BaseModel):
    # Unknown keys are refused: a misspelt parameter silently ignored is a wrong answer nobody notices. NaN and
    # Infinity (which Python's JSON parser accepts) would slip past every range check below, so they are refused too.
    # Strict, as TGI's serde is: `0` is not a boolean and `"3"` is not a number.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    max_new_tokens: int | None = Field(
        default=None, description="null: the configured default, else TGI's rule.", json_schema_extra=_range(min=1)
    )
    temperature: float | None = Field(default=None, json_schema_extra=_range(above=0))
    top_p: float | None = Field(default=None, json_schema_extra=_range(above=0, below=1))
    top_k: int | None = Field(default=None, json_schema_extra=_range(min=1))
    typical_p: float | None = Field(default=None, json_schema_extra=_range(above=0, below=1))
    repetition_penalty: float | None = Field(default=None, json_schema_extra=_range(above=0))
    frequency_penalty: float | None = Field(default=None, json_schema_extra=_range(min=-2, max=2))
    do_sample: bool = False
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: list[str] = Field(default_factory=list)
    return_full_text: bool | None = False
    details: bool = False
    decoder_input_details: bool = False
    truncate: int | None = Field(default=None, json_schema_extra=_range(min=1))
    best_of: int | None = Field(default=None, json_schema_extra=_range(min=1, max=1))
    top_n_tokens: int | None = Field(default=None, json_schema_extra=_range(max=0))
    watermark: bool = False
    grammar: Any | None = None
    adapter_id: str | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    inputs: str = Field(json_schema_extra={"minLength": 1})  # checked by validation, with TGI's message
    # TGI samples when `parameters` is left out entirely, and decodes greedily when it is present but silent.
    parameters: Parameters = Field(default_factory=lambda: Parameters(do_sample=True))


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None  # left out when decoding is greedy, as TGI does
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class InfoResponse(BaseModel):
    # TGI's fields, so its clients and dashboards read us unchanged.
    model_id: str
    model_sha: str | None = None
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int = 1
    max_client_batch_size: int = 1
    router: str = "mergeserve"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # Ours: batching, and what was merged, how, and how well.
    max_batch_size: int
    mode: str
    adapters: list[AdapterInfo] = Field(
        description="The merged adapters; `kinds` names settings beyond plain LoRA, e.g. dora."
    )
    dtype: str
    dtype_reason: str
    device_map: dict[str, int] = Field(description="Parameter bytes per device.")
    boot_seconds: dict[str, float]
    boot_peak_rss_bytes: dict[str, int] = Field(
        default_factory=dict, description="The process's peak RSS (VmHWM) at the end of each boot phase, in bytes."
    )
    parity: dict[str, Any] | None
    cache: dict[str, Any] | None = Field(
        default=None, description="Merge cache: key, status (hit, miss, rebuilt, ...), and the parity reference used."
    )
    combine: dict[str, Any] | None = Field(default=None, description="How the adapters were combined (method...).")
    engine: dict[str, Any] | None = Field(
        default=None,
        description="Which engine generates (torch or vllm); for vllm its version, config hash and per-arm gate.",
    )


# Every status a route can answer besides 200, so the OpenAPI schema is honest (schemathesis checks it).
GUARDED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key (when keys are configured)"},
    503: {"model": ErrorResponse, "description": "Model is loading, or the server is shutting down"},
}
ERRORS: dict[int | str, dict[str, Any]] = {
    **GUARDED,
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation error or timeout"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
    500: {"model": ErrorResponse, "description": "Internal error (a bug: see the server log)"},
}
# Each server-sent event, as OpenAPI tools read a stream: its `data` holds one JSON token event or error.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}
