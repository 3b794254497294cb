"""The HTTP layer: TGI's routes over an `Engine`, and Prometheus metrics from an app-owned registry.

`create_app(engine, config)` takes a ready engine (tests inject a tiny one) or None while boot is still running; the
CLI attaches the engine with `attach_engine` when boot finishes. Until then /health answers 503.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.config import Config
from server.engine import Engine, Generation
from server.metrics import Metrics
from server.scheduler import Overloaded
from server.schemas import (
    AdapterOut,
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    Token,
)
from server.validation import InputValidationError, validate

ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Input validation error"},
    424: {"model": ErrorResponse, "description": "Generation error"},
    503: {"model": ErrorResponse, "description": "Model is loading"},
}


class ServedError(Exception):
    """An error answered in TGI's shape: {"error": ..., "error_type": ...}."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


def attach_engine(app: FastAPI, engine: Engine) -> None:
    app.state.engine = engine
    app.state.metrics.engine_ready(engine.info)


def _engine(request: Request) -> Engine:
    engine: Engine | None = request.app.state.engine
    if engine is None:
        raise ServedError(503, "Model is loading", "healthcheck")
    return engine


def _timing_headers(engine: Engine, gen: Generation, validation_s: float, total_s: float) -> dict[str, str]:
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
        "x-merge-mode": engine.mode,
    }


def _response(body: GenerateRequest, gen: Generation) -> GenerateResponse:
    text = body.inputs + gen.text if body.parameters.return_full_text else gen.text
    details = None
    if body.parameters.details:
        assert gen.finish_reason is not None
        details = Details(
            finish_reason=gen.finish_reason,
            generated_tokens=len(gen.tokens),
            seed=gen.seed,
            prefill=[],  # filled only for decoder_input_details, which validation refuses
            tokens=[Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in gen.tokens],
        )
    return GenerateResponse(generated_text=text, details=details)


def create_app(engine: Engine | None, config: Config) -> FastAPI:
    app = FastAPI(title="mergeserve", version=__version__, description="LoRA adapters merged at boot, served as TGI.")
    app.state.engine = None
    app.state.metrics = metrics = Metrics()
    app.state.config = config
    served_adapter = "+".join(a.name for a in config.adapters)
    if engine is not None:
        attach_engine(app, engine)

    @app.exception_handler(ServedError)
    async def _served_error(request: Request, exc: ServedError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "error_type": exc.error_type}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        metrics.failures.labels(mode=config.mode, error_type="validation").inc()
        message = f"Failed to deserialize the JSON body into the target type: {where}: {first['msg']}"
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)

    @app.get("/health", responses={503: {"model": ErrorResponse, "description": "Still booting"}})
    async def health() -> Response:
        """200 with an empty body once the model is loaded, merged and verified; 503 until then."""
        if app.state.engine is None:
            return JSONResponse({"error": "loading", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    @app.get("/info", response_model=InfoResponse, responses=ERRORS)
    async def info(request: Request) -> InfoResponse:
        """TGI's /info fields, plus what was merged, in which dtype, where, how long boot took and the parity result."""
        e = _engine(request).info
        return InfoResponse(
            model_id=e.model_id,
            max_concurrent_requests=config.limits.max_concurrent_requests,
            max_stop_sequences=config.limits.max_stop_sequences,
            max_input_tokens=config.limits.max_input_tokens,
            max_total_tokens=config.limits.max_total_tokens,
            version=__version__,
            mode=e.mode,
            adapters=[AdapterOut(**vars(a)) for a in e.adapters],
            dtype=e.dtype,
            dtype_reason=e.dtype_reason,
            device_map=e.device_map,
            boot_seconds=e.boot_seconds,
            parity=e.parity.as_dict() if e.parity else None,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition of this app's registry."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def run_generate(request: Request, body: GenerateRequest) -> tuple[GenerateResponse, dict[str, str]]:
        engine = _engine(request)
        mode = engine.mode
        start = time.perf_counter()
        metrics.in_flight.labels(mode=mode).inc()
        try:
            prepared = validate(body.inputs, body.parameters, engine.tokenize, config.limits, served_adapter)
            validated = time.perf_counter()
            try:
                # The model runs on the scheduler's thread: /health and /metrics keep answering meanwhile.
                gen = await engine.generate_async(prepared)
            except Overloaded:
                raise ServedError(429, "Model is overloaded", "overloaded") from None
            except Exception as exc:  # any failure inside the model is TGI's "generation" error
                raise ServedError(424, f"Request failed during generation: {exc}", "generation") from exc
        except InputValidationError as exc:
            metrics.failures.labels(mode=mode, error_type="validation").inc()
            raise ServedError(422, str(exc), "validation") from None
        except ServedError as exc:
            metrics.failures.labels(mode=mode, error_type=exc.error_type).inc()
            raise
        finally:
            metrics.in_flight.labels(mode=mode).dec()
        total = time.perf_counter() - start
        metrics.request_duration.labels(mode=mode).observe(total)
        metrics.queue_duration.labels(mode=mode).observe(gen.queue_seconds)
        metrics.inference_duration.labels(mode=mode).observe(gen.inference_seconds)
        metrics.time_per_output_token.labels(mode=mode).observe(gen.inference_seconds / max(len(gen.tokens), 1))
        metrics.prompt_tokens.labels(mode=mode).observe(gen.prompt_tokens)
        metrics.generated_tokens.labels(mode=mode).observe(len(gen.tokens))
        metrics.requests.labels(mode=mode, finish_reason=gen.finish_reason).inc()
        return _response(body, gen), _timing_headers(engine, gen, validated - start, total)

    @app.post("/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(request: Request, body: GenerateRequest) -> JSONResponse:
        """Generate text for `inputs` (raw text: apply the chat template yourself), as TGI's /generate."""
        response, headers = await run_generate(request, body)
        return JSONResponse(response.model_dump(exclude_none=True), headers=headers)

    @app.post("/", response_model=list[GenerateResponse], responses=ERRORS)
    async def compat_generate(request: Request, body: CompatGenerateRequest) -> JSONResponse:
        """TGI's compat route: a JSON array with one response. `stream: true` is not served yet."""
        if body.stream:
            raise ServedError(422, "Input validation error: `stream` is not supported yet; use /generate", "validation")
        response, headers = await run_generate(request, body)
        return JSONResponse([response.model_dump(exclude_none=True)], headers=headers)

    return app
