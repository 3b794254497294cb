"""Wire types of the OpenAI-compatible routes: requests, error objects, and the statuses each route declares.

Requests are strict, as TGI's are (`0` is not a boolean), and refuse what is not served (n > 1) by schema. Unknown
fields are refused with a 400 that names them, never dropped: a parameter the client believes in and the server
ignores is a wrong answer nobody notices (vLLM's server logs such fields and goes on). Fields OpenAI defines but this
server does not implement are accepted only at their neutral value.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# TGI's finish reasons as OpenAI names them.
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False


class CommonRequest(BaseModel):
    """What completions and chat completions share."""

    # NaN compares false with every bound, so it would pass range checks; strict: `0` is not a boolean.
    model_config = ConfigDict(allow_inf_nan=False, strict=True, extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # a torch generator's seed is an unsigned 64-bit int
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is served.")
    # OpenAI's penalties (vLLM's too): over the generated tokens, logit -= frequency x count + presence x (count > 0).
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    # vLLM's extensions, as vLLM defines them: top_k -1 or 0 disables it; repetition_penalty over prompt and output.
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the provider's abuse monitoring: nothing to apply to the answer
    logit_bias: dict[str, float] | None = Field(default=None, description="Only empty: biases are not applied.")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("`logit_bias` is not supported by this server; leave it empty")
        return value


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="Log-probabilities of the chosen tokens and of this many alternatives."
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Needs `logprobs: true`.")
    response_format: dict[str, str] | None = Field(default=None, description='Only {"type": "text"}.')

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and value != {"type": "text"}:
            raise ValueError('`response_format` other than {"type": "text"} is not supported by this server')
        return value


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
