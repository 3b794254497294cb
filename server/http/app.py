"""The HTTP layer: TGI's routes over an `Engine`, and Prometheus metrics from an app-owned registry.

`create_app(engine, config)` takes a ready engine (tests inject a tiny one) or None while boot is still running; the
CLI attaches the engine with `attach_engine` when boot finishes. Until then /health answers 503.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.config.inputs import load_api_keys
from server.config.schema import Config
from server.engine.engine import Engine
from server.engine.types import Generation
from server.http.auth import KeyChecker, exposure_notices
from server.http.metrics import Metrics
from server.http.middleware import Lifecycle, RequestGuard
from server.http.openai import openai_error, openai_router
from server.http.serving import (
    ArmChooser,
    OwnedEvents,
    ServedError,
    TokenStream,
    Tracker,
    generation_failure,
    open_stream,
    run_to_end,
    until_disconnect,
)
from server.http.tgi_protocol import (
    AdapterOut,
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    Token,
)
from server.http.validation import InputValidationError, validate

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


class ModeHeader:
    """Every answer says which arm served it, errors included; routes that know better set it themselves.

    Plain ASGI rather than BaseHTTPMiddleware, which would buffer server-sent events and hide client disconnects.
    """

    def __init__(self, app: ASGIApp, mode: str) -> None:
        self.app, self.header = app, (b"x-merge-mode", mode.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_mode(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-merge-mode" for name, _ in headers):
                    message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_mode)


def attach_engine(app: FastAPI, engine: Engine) -> None:
    metrics: Metrics = app.state.metrics
    engine.scheduler.on_step = metrics.observe_step
    app.state.arms = ArmChooser(list(engine.arms), app.state.config.ab)
    app.state.engine = engine
    metrics.engine_ready(engine.info)


def current_engine(request: Request) -> Engine:
    engine: Engine | None = request.app.state.engine
    if engine is None:
        raise ServedError(503, "Model is loading", "healthcheck")
    return engine


def current_arm(request: Request) -> str:
    chooser: ArmChooser = request.app.state.arms
    return chooser.choose(request.headers.get("x-merge-mode"))


def _timing_headers(engine: Engine, gen: Generation, tracker: Tracker) -> dict[str, str]:
    total_s = time.perf_counter() - tracker.start
    validation_s = tracker.validated - tracker.start
    n = max(len(gen.tokens), 1)
    return {
        "x-compute-type": engine.device.type,
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
        tokens=[Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in gen.tokens],
    )


def _token_json(token: Any) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def create_app(engine: Engine | None, config: Config) -> FastAPI:
    app = FastAPI(title="mergeserve", version=__version__, description="LoRA adapters merged at boot, served as TGI.")
    app.state.engine = None
    served_adapter = "+".join(a.name for a in config.adapters)
    app.state.metrics = metrics = Metrics(adapter=served_adapter)
    app.state.config = config
    if engine is not None:
        attach_engine(app, engine)

    app.state.lifecycle = lifecycle = Lifecycle()
    sec = config.security
    keys = KeyChecker(load_api_keys(sec))
    for notice in exposure_notices(keys.enabled, sec.metrics_need_key, config.server.host, config.server.port):
        logging.getLogger("mergeserve").warning(notice)
    # Added innermost first: ModeHeader wraps CORS, which wraps the guard, so refusals get both sets of headers.
    app.add_middleware(
        RequestGuard,
        lifecycle=lifecycle,
        keys=keys,
        max_body_bytes=sec.max_body_bytes,
        metrics_need_key=sec.metrics_need_key,
    )
    if sec.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sec.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-merge-mode"],
            expose_headers=["x-merge-mode"],
        )
    app.add_middleware(ModeHeader, mode=config.mode)

    @app.exception_handler(ServedError)
    async def _served_error(request: Request, exc: ServedError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return openai_error(exc.status, exc.message, exc.error_type)
        return JSONResponse({"error": exc.message, "error_type": exc.error_type}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes (404) and methods (405) answer in the same shapes as every other error.
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        if request.url.path.startswith("/v1/"):
            response = openai_error(exc.status_code, str(exc.detail), "NotFoundError" if kind == "not_found" else kind)
        else:
            response = JSONResponse({"error": str(exc.detail), "error_type": kind}, status_code=exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a refusal: the client still gets TGI's error shape (the traceback goes to the log).
        metrics.failures.labels(mode=config.mode, adapter=served_adapter, error_type="internal").inc()
        message = f"Internal server error ({type(exc).__name__}); see the server log"
        if request.url.path.startswith("/v1/"):
            return openai_error(500, message, "InternalServerError")
        return JSONResponse({"error": message, "error_type": "internal"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        metrics.failures.labels(mode=config.mode, adapter=served_adapter, error_type="validation").inc()
        message = f"Failed to deserialize the JSON body into the target type: {where}: {first['msg']}"
        if request.url.path.startswith("/v1/"):
            return openai_error(400, message, "BadRequestError", where)
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)

    @app.get(
        "/health",
        response_class=Response,
        responses={
            200: {"description": "Ready: an empty body", "content": None},
            503: {"model": ErrorResponse, "description": "Booting, shutting down, or the model thread died"},
        },
    )
    async def health() -> Response:
        """200 with an empty body once the model is loaded, merged and verified; 503 until then, while draining, and
        for good once the model thread has died (the process then exits for its orchestrator to restart it)."""
        if lifecycle.draining:
            return JSONResponse({"error": "shutting down", "error_type": "healthcheck"}, status_code=503)
        engine: Engine | None = app.state.engine
        if engine is None:
            return JSONResponse({"error": "loading", "error_type": "healthcheck"}, status_code=503)
        if engine.scheduler.death is not None:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    @app.get("/info", response_model=InfoResponse, responses=ERRORS)
    async def info(request: Request) -> InfoResponse:
        """TGI's /info fields, plus what was merged, in which dtype, where, how long boot took and the parity result."""
        e = current_engine(request).info
        return InfoResponse(
            model_id=e.model_id,
            max_concurrent_requests=config.limits.max_concurrent_requests,
            max_stop_sequences=config.limits.max_stop_sequences,
            max_input_tokens=config.limits.max_input_tokens,
            max_total_tokens=config.limits.max_total_tokens,
            max_batch_size=config.limits.max_batch_size,
            version=__version__,
            mode=e.mode,
            adapters=[AdapterOut(**vars(a)) for a in e.adapters],
            dtype=e.dtype,
            dtype_reason=e.dtype_reason,
            device_map=e.device_map,
            boot_seconds=e.boot_seconds,
            parity=e.parity.as_dict() if e.parity else None,
            cache=e.cache or None,
            combine=e.combine,
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **GUARDED},
    )
    async def prometheus() -> Response:
        """Prometheus text exposition of this app's registry."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def start(
        request: Request, body: GenerateRequest, owner: AsyncExitStack
    ) -> tuple[Engine, Tracker, TokenStream]:
        """Open the request's tracker and token stream on `owner`, which closes both however the request ends."""
        engine = current_engine(request)
        tracker = owner.enter_context(Tracker(metrics, current_arm(request)))
        args = (body.inputs, body.parameters, engine.tokenize, config.limits, served_adapter, engine.token_floor)
        try:
            prepared = await run_in_threadpool(validate, *args)  # tokenizing a 1 MiB body takes seconds
        except InputValidationError as exc:
            raise ServedError(422, str(exc), "validation") from None
        tracker.validated = time.perf_counter()
        stream = await open_stream(engine, prepared, tracker, config.limits.request_timeout_seconds)
        return engine, tracker, await owner.enter_async_context(aclosing(stream))

    async def generate_one(request: Request, body: GenerateRequest) -> tuple[GenerateResponse, dict[str, str]]:
        async with AsyncExitStack() as owner:
            engine, tracker, stream = await start(request, body, owner)
            gen = await run_to_end(stream, tracker)
        text = body.inputs + gen.text if body.parameters.return_full_text else gen.text
        response = GenerateResponse(generated_text=text, details=_details(gen) if body.parameters.details else None)
        return response, _timing_headers(engine, gen, tracker)

    @app.post("/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(request: Request, body: GenerateRequest) -> JSONResponse:
        """Generate text for `inputs` (raw text: apply the chat template yourself), as TGI's /generate."""
        response, headers = await until_disconnect(request.receive, generate_one(request, body))
        return JSONResponse(response.model_dump(exclude_none=True), headers=headers)

    async def sse_events(body: GenerateRequest, tracker: Tracker, stream: TokenStream) -> AsyncGenerator[str, None]:
        index, gen = 0, Generation()
        try:
            async for token, gen in stream:
                index += 1
                event: dict[str, Any] = {"index": index, "token": _token_json(token), "top_tokens": None,
                                         "generated_text": None, "details": None}  # fmt: skip
                if gen.finish_reason is not None:
                    text = body.inputs + gen.text if body.parameters.return_full_text else gen.text
                    event["generated_text"] = text
                    if body.parameters.details:
                        event["details"] = {"finish_reason": gen.finish_reason, "generated_tokens": len(gen.tokens),
                                            "seed": gen.seed, "input_length": gen.prompt_tokens}  # fmt: skip
                yield json.dumps(event)
        except Exception as exc:  # after the 200 is sent, errors travel inside the stream
            error = generation_failure(exc)
            tracker.fail(error.error_type)
            yield json.dumps({"error": error.message, "error_type": error.error_type})
            return
        tracker.finish(gen)  # a stream that stops early is closed as cancelled by its owner (OwnedEvents)

    async def stream_response(request: Request, body: GenerateRequest) -> EventSourceResponse:
        if body.parameters.decoder_input_details:
            raise ServedError(
                422,
                "Input validation error: `decoder_input_details` == true is not supported when streaming tokens",
                "validation",
            )
        async with AsyncExitStack() as owner:
            _engine, tracker, stream = await start(request, body, owner)
            headers = {"x-merge-mode": tracker.mode, "x-accel-buffering": "no"}
            if tracker.queue_seconds is not None:  # the stream starts after admission, so its queue time is known
                headers["x-queue-time"] = str(int(tracker.queue_seconds * 1000))
            return OwnedEvents(sse_events(body, tracker, stream), owner.pop_all(), headers)

    @app.post(
        "/generate_stream",
        responses={200: {"description": "Server-sent events, one per token", "content": SSE}, **ERRORS},
        response_class=EventSourceResponse,
    )
    async def generate_stream(request: Request, body: GenerateRequest) -> EventSourceResponse:
        """TGI's server-sent events: one `data:` event per token; the last carries `generated_text` and `details`."""
        return await stream_response(request, body)

    @app.post("/", response_model=list[GenerateResponse], responses={200: {"content": SSE}, **ERRORS})
    async def compat_generate(request: Request, body: CompatGenerateRequest) -> Response:
        """TGI's compat route: `stream: true` streams as /generate_stream, otherwise a one-element JSON array."""
        if body.stream:
            return await stream_response(request, body)
        response, headers = await until_disconnect(request.receive, generate_one(request, body))
        return JSONResponse([response.model_dump(exclude_none=True)], headers=headers)

    app.include_router(openai_router(config, metrics, current_engine, current_arm))
    return app
