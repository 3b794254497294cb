"""TGI's routes: /generate, /generate_stream, the compat route /, /info, /health and /metrics.

Each reads the engine, config and metrics from `request.app.state`, so one router serves every app built (tests build
many). Until boot attaches an engine, /health answers 503 and the generation routes answer 503 "Model is loading".
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse

from server import __version__
from server.engine.engine import Engine
from server.engine.types import Generation
from server.engine.types import Token as EngineToken
from server.http.errors import ServedError, invalid_input
from server.http.metrics import Metrics
from server.http.middleware import Lifecycle
from server.http.serving import (
    TokenStream,
    Tracker,
    current_engine,
    events,
    run_to_end,
    start,
    tracked,
    until_disconnect,
)
from server.http.tgi_protocol import (
    ERRORS,
    GUARDED,
    SSE,
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    Token,
)

router = APIRouter()
# What /info repeats, under the same names, from the limits and from the engine.
INFO_LIMITS = frozenset(
    {"max_concurrent_requests", "max_stop_sequences", "max_input_tokens", "max_total_tokens", "max_batch_size"}
)
INFO_FACTS = (
    "model_id", "model_sha", "mode", "dtype", "dtype_reason", "device_map", "boot_seconds", "boot_peak_rss_bytes",
    "combine", "engine",
)  # fmt: skip


def _timing_headers(engine: Engine, gen: Generation, tracker: Tracker) -> dict[str, str]:
    total_s = time.perf_counter() - tracker.start
    validation_s = tracker.validated - tracker.start
    n = max(len(gen.tokens), 1)
    return {
        "x-compute-type": engine.device_type,
        "x-compute-time": f"{total_s:.6f}",
        "x-total-time": str(int(total_s * 1000)),
        "x-validation-time": str(int(validation_s * 1000)),
        "x-queue-time": str(int(gen.queue_seconds * 1000)),
        "x-inference-time": str(int(gen.inference_seconds * 1000)),
        "x-time-per-token": str(int(gen.inference_seconds * 1000 / n)),
        "x-prompt-tokens": str(gen.prompt_tokens),
        "x-generated-tokens": str(len(gen.tokens)),
        "x-merge-mode": tracker.mode,
    }


def _details(gen: Generation) -> Details:
    assert gen.finish_reason is not None
    return Details(
        finish_reason=gen.finish_reason,
        generated_tokens=len(gen.tokens),
        seed=gen.seed,
        prefill=[],  # filled only for decoder_input_details, which validation refuses
        tokens=[_wire(t) for t in gen.tokens],
    )


def _wire(token: EngineToken) -> Token:
    """TGI's token: the engine's without its OpenAI-only alternatives (TGI's `top_n_tokens` is refused)."""
    return Token(id=token.id, text=token.text, logprob=token.logprob, special=token.special)


def _text(body: GenerateRequest, gen: Generation) -> str:
    return body.inputs + gen.text if body.parameters.return_full_text else gen.text


@router.get(
    "/health",
    response_class=Response,
    responses={
        200: {"description": "Ready: an empty body", "content": None},
        503: {"model": ErrorResponse, "description": "Booting, shutting down, or the model thread died"},
    },
)
async def health(request: Request) -> Response:
    """200 with an empty body once the model is loaded, merged and verified; 503 until then, while draining, and
    for good once the model thread has died (the process then exits for its orchestrator to restart it)."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    engine: Engine | None = request.app.state.engine
    if lifecycle.draining:
        raise ServedError(503, "shutting down", "healthcheck")
    if engine is None:
        raise ServedError(503, "loading", "healthcheck")
    if engine.scheduler.death is not None:
        raise ServedError(503, "unhealthy", "healthcheck")
    return Response(status_code=200)


@router.get("/info", response_model=InfoResponse, responses=ERRORS)
async def info(request: Request) -> InfoResponse:
    """TGI's /info fields, plus what was merged, in which dtype, where, how long boot took and the parity result."""
    e = current_engine(request).info
    limits = request.app.state.config.limits.model_dump(include=INFO_LIMITS)
    facts = {name: getattr(e, name) for name in INFO_FACTS}
    parity = e.parity.as_dict() if e.parity else None
    return InfoResponse(**limits, **facts, version=__version__, adapters=list(e.adapters), parity=parity,
                        cache=e.cache or None)  # fmt: skip


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **GUARDED},
)
async def prometheus(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def generate_one(request: Request, body: GenerateRequest) -> tuple[GenerateResponse, dict[str, str]]:
    async with AsyncExitStack() as owner:
        engine, tracker, stream = await start(request, body.inputs, body.parameters, owner)
        gen = await run_to_end(stream, tracker)
    details = _details(gen) if body.parameters.details else None
    return GenerateResponse(generated_text=_text(body, gen), details=details), _timing_headers(engine, gen, tracker)


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(request: Request, body: GenerateRequest) -> JSONResponse:
    """Generate text for `inputs` (raw text: apply the chat template yourself), as TGI's /generate."""
    response, headers = await until_disconnect(request.receive, generate_one(request, body))
    return JSONResponse(response.model_dump(exclude_none=True), headers=headers)


async def token_events(
    body: GenerateRequest, tracker: Tracker, stream: TokenStream
) -> AsyncGenerator[dict[str, Any], None]:
    """TGI's stream events, one per token; the last carries `generated_text` and, when asked for, `details`."""
    index = 0
    async for token, gen in tracked(stream, tracker):
        index += 1
        event: dict[str, Any] = {"index": index, "token": _wire(token).model_dump(), "top_tokens": None,
                                 "generated_text": None, "details": None}  # fmt: skip
        if gen.finish_reason is not None:
            event["generated_text"] = _text(body, gen)
            if body.parameters.details:
                event["details"] = {"finish_reason": gen.finish_reason, "generated_tokens": len(gen.tokens),
                                    "seed": gen.seed, "input_length": gen.prompt_tokens}  # fmt: skip
        yield event


async def stream_response(request: Request, body: GenerateRequest) -> EventSourceResponse:
    if body.parameters.decoder_input_details:
        message = "Input validation error: `decoder_input_details` == true is not supported when streaming tokens"
        raise invalid_input(message)
    async with AsyncExitStack() as owner:
        _engine, tracker, stream = await start(request, body.inputs, body.parameters, owner)
        headers = {"x-merge-mode": tracker.mode, "x-accel-buffering": "no"}
        if tracker.queue_seconds is not None:  # the stream starts after admission, so its queue time is known
            headers["x-queue-time"] = str(int(tracker.queue_seconds * 1000))
        return events(request.url.path, token_events(body, tracker, stream), owner.pop_all(), headers)


@router.post(
    "/generate_stream",
    responses={200: {"description": "Server-sent events, one per token", "content": SSE}, **ERRORS},
    response_class=EventSourceResponse,
)
async def generate_stream(request: Request, body: GenerateRequest) -> EventSourceResponse:
    """TGI's server-sent events: one `data:` event per token; the last carries `generated_text` and `details`."""
    return await stream_response(request, body)


@router.post("/", response_model=list[GenerateResponse], responses={200: {"content": SSE}, **ERRORS})
async def compat_generate(request: Request, body: CompatGenerateRequest) -> Response:
    """TGI's compat route: `stream: true` streams as /generate_stream, otherwise a one-element JSON array."""
    if body.stream:
        return await stream_response(request, body)
    response, headers = await until_disconnect(request.receive, generate_one(request, body))
    return JSONResponse([response.model_dump(exclude_none=True)], headers=headers)
