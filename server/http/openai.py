"""OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions), following vLLM's conventions.

Each request is mapped onto TGI's parameters and goes through the same validation and engine path as /generate.
OpenAI samples by default and treats temperature 0 as greedy.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.config.schema import Config
from server.engine.engine import Engine
from server.engine.types import Generation
from server.http.metrics import Metrics
from server.http.serving import (
    OwnedEvents,
    ServedError,
    TokenStream,
    Tracker,
    generation_failure,
    open_stream,
    run_to_end,
    until_disconnect,
)
from server.http.tgi_protocol import Parameters
from server.http.validation import InputValidationError, validate

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


class _Common(BaseModel):
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


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, le=0, description="Log-probabilities are not served yet.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


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


def _usage(gen: Generation) -> dict[str, int]:
    n = len(gen.tokens)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}


def _parameters(body: _Common, max_tokens: int | None) -> Parameters:
    greedy = body.temperature == 0
    return Parameters(
        max_new_tokens=max_tokens,
        do_sample=not greedy,
        temperature=None if greedy or body.temperature in (None, 1.0) else body.temperature,
        top_p=None if body.top_p in (None, 1.0) else body.top_p,
        seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        frequency_penalty=body.frequency_penalty,
    )


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def openai_router(
    config: Config,
    metrics: Metrics,
    current_engine: Callable[[Request], Engine],
    current_arm: Callable[[Request], str],
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS)
    model_id = config.model.model_id
    served_adapter = "+".join(a.name for a in config.adapters)
    created = int(time.time())

    def check_model(name: str) -> JSONResponse | None:
        if name in (model_id, served_adapter):
            return None
        return openai_error(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    async def begin(
        request: Request, body: _Common, prompt: str, max_tokens: int | None, chat: bool, owner: AsyncExitStack
    ) -> tuple[Engine, Tracker, TokenStream] | JSONResponse:
        """Open the request's tracker and token stream on `owner`, which closes both however the request ends.

        A ServedError (429, 424) propagates: the app answers it in OpenAI's shape, and the tracker records it.
        """
        if (missing := check_model(body.model)) is not None:
            return missing
        engine = current_engine(request)
        tracker = owner.enter_context(Tracker(metrics, current_arm(request)))
        # A chat template already holds its special tokens; adding BOS again would change the prompt.
        tokenize = (
            (lambda text: engine.tokenizer(text, add_special_tokens=False).input_ids) if chat else engine.tokenize
        )
        args = (prompt, _parameters(body, max_tokens), tokenize, config.limits, served_adapter, engine.token_floor)
        try:
            prepared = await run_in_threadpool(validate, *args)  # tokenizing a 1 MiB body takes seconds
        except InputValidationError as exc:
            tracker.fail("validation")
            return openai_error(400, str(exc), "BadRequestError")
        stream = await open_stream(engine, prepared, tracker, config.limits.request_timeout_seconds)
        return engine, tracker, await owner.enter_async_context(aclosing(stream))

    def sse(chunks: AsyncGenerator[dict[str, Any], None], mode: str, owner: AsyncExitStack) -> OwnedEvents:
        async def lines() -> AsyncGenerator[str, None]:
            try:
                async for chunk in chunks:
                    yield json.dumps(chunk)
            except ServedError as exc:  # after the 200, a failure is the stream's last event, as vLLM sends it
                yield json.dumps({"error": {"message": exc.message, "type": exc.error_type, "param": None,
                                            "code": exc.status}})  # fmt: skip
            yield "[DONE]"

        owner.push_async_callback(chunks.aclose)
        return OwnedEvents(lines(), owner, {"x-merge-mode": mode})

    async def deltas(stream: TokenStream, tracker: Tracker) -> AsyncIterator[tuple[str, Generation]]:
        gen = Generation()
        try:
            async for token, gen in stream:
                yield ("" if token.special else token.text), gen
        except Exception as exc:
            error = generation_failure(exc)
            tracker.fail(error.error_type)
            raise error from exc
        tracker.finish(gen)  # a stream that stops early is closed as cancelled by its owner (OwnedEvents)

    @router.get("/models")
    async def models() -> dict[str, Any]:
        """The served model, under its base id and under its adapter set's name."""
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "mergeserve", "root": model_id}
                 for name in dict.fromkeys([model_id, served_adapter])]  # fmt: skip
        return {"object": "list", "data": cards}

    @router.post("/completions", response_model=None, responses=STREAMED)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        """OpenAI text completion; `prompt` is raw text, as in /generate."""
        work = complete(request, body)
        return await (work if body.stream else until_disconnect(request.receive, work))

    async def complete(request: Request, body: CompletionRequest) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return openai_error(400, "exactly one prompt per request is served", "BadRequestError", "prompt")
        async with AsyncExitStack() as owner:
            started = await begin(request, body, prompts[0], body.max_tokens, False, owner)
            if isinstance(started, JSONResponse):
                return started
            _engine, tracker, stream = started
            rid, prefix = f"cmpl-{uuid.uuid4().hex}", prompts[0] if body.echo else ""
            base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model}
            if not body.stream:
                gen = await run_to_end(stream, tracker)
                choice = {"index": 0, "text": prefix + gen.text, "logprobs": None,
                          "finish_reason": FINISH[gen.finish_reason or "length"]}  # fmt: skip
                payload = {**base, "choices": [choice], "usage": _usage(gen)}
                return JSONResponse(payload, headers={"x-merge-mode": tracker.mode})

            async def chunks() -> AsyncGenerator[dict[str, Any], None]:
                if prefix:
                    yield {**base, "choices": [{"index": 0, "text": prefix, "logprobs": None, "finish_reason": None}]}
                async for text, gen in deltas(stream, tracker):
                    reason = FINISH[gen.finish_reason] if gen.finish_reason else None
                    yield {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
                    if reason and (body.stream_options or {}).get("include_usage"):
                        yield {**base, "choices": [], "usage": _usage(gen)}

            return sse(chunks(), tracker.mode, owner.pop_all())

    @router.post("/chat/completions", response_model=None, responses=STREAMED)
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        """OpenAI chat completion, prompted through the tokenizer's chat template."""
        work = chat(request, body)
        return await (work if body.stream else until_disconnect(request.receive, work))

    async def chat(request: Request, body: ChatRequest) -> Response:
        engine = current_engine(request)
        messages = [m.model_dump() for m in body.messages]
        template = engine.tokenizer.apply_chat_template
        try:  # off the event loop, as tokenizing is: rendering a huge conversation takes a while
            prompt = str(await run_in_threadpool(template, messages, tokenize=False, add_generation_prompt=True))
        except Exception as exc:  # templates raise on role orders they do not allow
            return openai_error(400, f"cannot apply the chat template: {exc}", "BadRequestError", "messages")
        async with AsyncExitStack() as owner:
            max_tokens = body.max_completion_tokens or body.max_tokens
            started = await begin(request, body, prompt, max_tokens, True, owner)
            if isinstance(started, JSONResponse):
                return started
            engine, tracker, stream = started
            base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
            if not body.stream:
                gen = await run_to_end(stream, tracker)
                choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
                          "finish_reason": FINISH[gen.finish_reason or "length"]}  # fmt: skip
                payload = {**base, "object": "chat.completion", "choices": [choice], "usage": _usage(gen)}
                return JSONResponse(payload, headers={"x-merge-mode": tracker.mode})

            async def chunks() -> AsyncGenerator[dict[str, Any], None]:
                chunk = {**base, "object": "chat.completion.chunk"}
                opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}  # fmt: skip
                yield {**chunk, "choices": [opening]}
                async for text, gen in deltas(stream, tracker):
                    reason = FINISH[gen.finish_reason] if gen.finish_reason else None
                    delta = {"content": text} if text else {}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                    yield {**chunk, "choices": [choice]}
                    if reason and (body.stream_options or {}).get("include_usage"):
                        yield {**chunk, "choices": [], "usage": _usage(gen)}

            return sse(chunks(), tracker.mode, owner.pop_all())

    return router
