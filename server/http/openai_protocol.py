"""Wire types of the OpenAI-compatible routes: requests, error objects, and the statuses each route declares.

Requests are strict, as TGI's are (`0` is not a boolean), and refuse what is not served (n > 1) by schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# TGI's finish reasons as OpenAI names them.
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


class CommonRequest(BaseModel):
    """What completions and chat completions share."""

    # NaN compares false with every bound, so it would pass range checks; strict: `0` is not a boolean.
    model_config = ConfigDict(allow_inf_nan=False, strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # a torch generator's seed is an unsigned 64-bit int
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is served.")
    frequency_penalty: float | None = None
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="Log-probabilities of the chosen tokens and of this many alternatives."
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Needs `logprobs: true`.")


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


_ERROR_CASES = {
    400: "Invalid request (validation)",
    401: "Missing or invalid API key (when keys are configured)",
    404: "Unknown model",
    413: "Request body too large",
    424: "Generation error or timeout",
    429: "Model is overloaded",
    500: "Internal error (a bug: see the server log)",
    503: "Model is loading, or the server is shutting down",
}
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": text} for status, text in _ERROR_CASES.items()
}

# With `stream: true` the 200 is server-sent events instead of JSON.
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or server-sent events", "content": {"application/json": {}, "text/event-stream": {}}}
}
