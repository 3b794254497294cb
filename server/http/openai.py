"""OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions), following vLLM's conventions.

Each request is mapped onto TGI's parameters and goes through the same validation and engine path as /generate;
where OpenAI's rules differ from TGI's they are OpenAI's here (docs/reference/api.md lists them side by side):
- OpenAI samples by default, and temperature 0 is greedy whatever top_p and top_k say;
- frequency_penalty and presence_penalty count the generated tokens (TGI's frequency_penalty divides by the length);
- the returned text ends where a stop string begins (server.http.openai_text); TGI's keeps the stop string.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.config.schema import Config
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import Generation
from server.http.errors import ServedError
from server.http.openai_logprobs import CompletionLogprobs, chat_logprobs, token_decoder
from server.http.openai_protocol import (
    FINISH,
    OPENAI_ERRORS,
    STREAMED,
    ChatRequest,
    CommonRequest,
    CompletionRequest,
)
from server.http.openai_text import StopText
from server.http.serving import (
    TokenStream,
    Tracker,
    current_engine,
    events,
    run_to_end,
    served_adapter,
    start,
    tracked,
    until_disconnect,
)
from server.http.tgi_protocol import Parameters

router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS)


def _usage(gen: Generation) -> dict[str, int]:
    n = len(gen.tokens)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}


def _stops(body: CommonRequest) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def _parameters(body: CommonRequest, max_tokens: int | None) -> Parameters:
    """TGI's parameters for `body`. A greedy request (temperature 0) drops top_p, top_k and the seed: TGI would
    sample whenever a warper is set, OpenAI and vLLM never sample at temperature 0."""
    greedy = body.temperature == 0
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else None  # vLLM: -1 and 0 disable it
    return Parameters(
        max_new_tokens=max_tokens,
        do_sample=not greedy,
        temperature=None if greedy or body.temperature in (None, 1.0) else body.temperature,
        top_p=None if greedy or body.top_p in (None, 1.0) else body.top_p,
        top_k=None if greedy else top_k,
        repetition_penalty=body.repetition_penalty,
        seed=None if greedy else body.seed,
        stop=_stops(body),
    )


def _penalties(body: CommonRequest) -> Callable[[SamplingParams], SamplingParams]:
    """OpenAI's penalties, which TGI's parameters do not carry (TGI's frequency_penalty has another meaning)."""
    return lambda params: replace(
        params, output_frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty
    )


def _bad_request(message: str, param: str) -> ServedError:
    return ServedError(400, message, "validation", openai_type="BadRequestError", param=param)


def _served_names(request: Request) -> list[str]:
    """The names the model answers to: its base id, and its adapter set's name."""
    config: Config = request.app.state.config
    return list(dict.fromkeys([config.model.model_id, served_adapter(config)]))


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    """The served model, under its base id and under its adapter set's name."""
    created: int = request.app.state.started
    root = request.app.state.config.model.model_id
    cards = [{"id": name, "object": "model", "created": created, "owned_by": "mergeserve", "root": root}
             for name in _served_names(request)]  # fmt: skip
    return {"object": "list", "data": cards}


async def _begin(
    request: Request, body: CommonRequest, prompt: str, max_tokens: int | None, top: int | None, owner: AsyncExitStack
) -> tuple[Engine, Tracker, TokenStream]:
    """`start`, for a model name the server answers to (a 404 otherwise, before the engine is asked); `top`: the
    alternatives each token carries. A chat prompt is a rendered template, tokenized without a second BOS."""
    if body.model not in _served_names(request):
        raise ServedError(404, f"The model `{body.model}` does not exist.", "not_found", openai_type="NotFoundError",
                          param="model")  # fmt: skip
    chat = isinstance(body, ChatRequest)
    return await start(request, prompt, _parameters(body, max_tokens), owner, chat, top or 0, _penalties(body))


@router.post("/completions", response_model=None, responses=STREAMED)
async def completions(request: Request, body: CompletionRequest) -> Response:
    """OpenAI text completion; `prompt` is raw text, as in /generate."""
    work = complete(request, body)
    return await (work if body.stream else until_disconnect(request.receive, work))


async def complete(request: Request, body: CompletionRequest) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise _bad_request("exactly one prompt per request is served", "prompt")
    if body.echo and body.logprobs is not None:
        raise _bad_request("log-probabilities of an echoed prompt are not served; drop `echo` or `logprobs`", "echo")
    async with AsyncExitStack() as owner:
        _engine, tracker, stream = await _begin(request, body, prompts[0], body.max_tokens, body.logprobs, owner)
        rid, prefix = f"cmpl-{uuid.uuid4().hex}", prompts[0] if body.echo else ""
        logprobs = CompletionLogprobs(token_decoder(_engine.tokenizer), body.logprobs)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model}
        text = StopText(_stops(body))
        if not body.stream:
            gen = await run_to_end(stream, tracker)
            answer = text.final(gen.text, gen.finish_reason)
            choice = {"index": 0, "text": prefix + answer, "logprobs": logprobs.of(gen.tokens),
                      "finish_reason": FINISH[gen.finish_reason or "length"]}  # fmt: skip
            payload = {**base, "choices": [choice], "usage": _usage(gen)}
            return JSONResponse(payload, headers={"x-merge-mode": tracker.mode})

        async def chunks() -> AsyncGenerator[dict[str, Any], None]:
            lead = prefix  # an echoed prompt opens the first token's chunk, as vLLM streams it
            async for token, gen in tracked(stream, tracker):
                reason = FINISH[gen.finish_reason] if gen.finish_reason else None
                delta, lead = lead + text.delta(gen.text, gen.finish_reason), ""
                lp = logprobs.of([token])
                yield {**base, "choices": [{"index": 0, "text": delta, "logprobs": lp, "finish_reason": reason}]}
                if reason and body.stream_options and body.stream_options.include_usage:
                    yield {**base, "choices": [], "usage": _usage(gen)}

        return events(request.url.path, chunks(), owner.pop_all(), {"x-merge-mode": tracker.mode}, done="[DONE]")


@router.post("/chat/completions", response_model=None, responses=STREAMED)
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    """OpenAI chat completion, prompted through the tokenizer's chat template."""
    work = chat(request, body)
    return await (work if body.stream else until_disconnect(request.receive, work))


async def chat(request: Request, body: ChatRequest) -> Response:
    engine = current_engine(request)
    if body.top_logprobs and not body.logprobs:
        raise _bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    messages = [m.model_dump() for m in body.messages]
    template = engine.tokenizer.apply_chat_template
    try:  # off the event loop, as tokenizing is: rendering a huge conversation takes a while
        prompt = str(await run_in_threadpool(template, messages, tokenize=False, add_generation_prompt=True))
    except Exception as exc:  # templates raise on role orders they do not allow
        raise _bad_request(f"cannot apply the chat template: {exc}", "messages") from None
    async with AsyncExitStack() as owner:
        max_tokens = body.max_completion_tokens or body.max_tokens
        engine, tracker, stream = await _begin(request, body, prompt, max_tokens, body.top_logprobs, owner)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        decode = token_decoder(engine.tokenizer)
        text = StopText(_stops(body))
        if not body.stream:
            gen = await run_to_end(stream, tracker)
            content = text.final(gen.text, gen.finish_reason)
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "logprobs": chat_logprobs(decode, body.logprobs, gen.tokens),
                      "finish_reason": FINISH[gen.finish_reason or "length"]}  # fmt: skip
            payload = {**base, "object": "chat.completion", "choices": [choice], "usage": _usage(gen)}
            return JSONResponse(payload, headers={"x-merge-mode": tracker.mode})

        async def chunks() -> AsyncGenerator[dict[str, Any], None]:
            chunk = {**base, "object": "chat.completion.chunk"}
            opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}  # fmt: skip
            yield {**chunk, "choices": [opening]}
            async for token, gen in tracked(stream, tracker):
                reason = FINISH[gen.finish_reason] if gen.finish_reason else None
                piece = text.delta(gen.text, gen.finish_reason)
                delta = {"content": piece} if piece else {}
                lp = chat_logprobs(decode, body.logprobs, [token])
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
                yield {**chunk, "choices": [choice]}
                if reason and body.stream_options and body.stream_options.include_usage:
                    yield {**chunk, "choices": [], "usage": _usage(gen)}

        return events(request.url.path, chunks(), owner.pop_all(), {"x-merge-mode": tracker.mode}, done="[DONE]")
