"""Every error the HTTP layer answers, and the one place that decides its shape.

A route's dialect follows its path: under /v1/ clients are OpenAI's and read {"error": {"message", "type", "param",
"code"}}; everywhere else they are TGI's and read {"error", "error_type"}. The same body travels as a JSON response
before the 200, and as the stream's last server-sent event after it (as TGI and vLLM both do).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.config.schema import Config
from server.errors import ExitCode, MergeserveError
from server.http.metrics import Metrics

OPENAI_PREFIX = "/v1/"


class ServedError(MergeserveError):
    """A refusal or failure answered to the client: TGI's status and error_type, and what OpenAI's clients read instead.

    It is the one error type (`server.errors.MergeserveError`) with its HTTP rendering attached; the message is the
    whole `problem` (TGI's clients match its validation texts exactly, so no "; fix:" is appended).

    `openai_status` and `openai_type` default to TGI's; OpenAI's clients expect 400 for a request they can fix where
    TGI says 422, and an error class name (BadRequestError, ...) as the type.
    """

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        *,
        openai_status: int | None = None,
        openai_type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, "")
        self.status, self.message, self.error_type = status, message, error_type
        self.openai_status, self.openai_type, self.param = openai_status or status, openai_type or error_type, param
        self.headers = headers or {}


class RequestTimeout(Exception):
    """A request still generating at its deadline (limits.request_timeout_seconds); its slot is freed."""


def generation_failure(exc: BaseException) -> ServedError:
    """TGI's 424 for a request that failed after validation; a timeout says so in its message and error_type."""
    if isinstance(exc, RequestTimeout):
        return ServedError(424, str(exc), "timeout")
    return ServedError(424, f"Request failed during generation: {exc}", "generation")


def invalid_input(message: str, param: str | None = None) -> ServedError:
    """A request the client can fix: TGI's 422 "validation", OpenAI's 400 BadRequestError."""
    return ServedError(422, message, "validation", openai_status=400, openai_type="BadRequestError", param=param)


# A refusal raised below the HTTP layer (a config or model check, say) answers by its exit code's meaning.
_BY_EXIT_CODE = {
    ExitCode.BAD_INPUT: (422, "validation", 400, "BadRequestError"),
    ExitCode.CHECK_FAILED: (503, "unavailable", 503, "ServiceUnavailableError"),
}


def as_served(exc: MergeserveError) -> ServedError:
    """Any refusal as an HTTP error: a ServedError as it is, any other by its exit code (a bug: 500)."""
    if isinstance(exc, ServedError):
        return exc
    status, kind, openai_status, openai_type = _BY_EXIT_CODE.get(
        exc.exit_code, (500, "internal", 500, "InternalServerError")
    )
    return ServedError(status, exc.line(), kind, openai_status=openai_status, openai_type=openai_type)


def shaped(path: str, error: ServedError) -> tuple[int, dict[str, Any]]:
    """The status and body `error` is answered with on `path`: the only place the dialect is chosen."""
    if path.startswith(OPENAI_PREFIX):
        body = {"message": error.message, "type": error.openai_type, "param": error.param, "code": error.openai_status}
        return error.openai_status, {"error": body}
    return error.status, {"error": error.message, "error_type": error.error_type}


def error_response(path: str, error: ServedError) -> JSONResponse:
    status, body = shaped(path, error)
    return JSONResponse(body, status_code=status, headers=error.headers or None)


def error_event(path: str, error: ServedError) -> str:
    """A failure after the 200: the stream's last server-sent event, in the route's dialect."""
    return json.dumps(shaped(path, error)[1])


def _count_failure(request: Request, error_type: str) -> None:
    metrics: Metrics = request.app.state.metrics
    config: Config = request.app.state.config
    metrics.request_failures.labels(mode=config.mode, adapter=metrics.adapter, error_type=error_type).inc()


async def _served(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MergeserveError)
    return error_response(request.url.path, as_served(exc))


async def _http(request: Request, exc: Exception) -> JSONResponse:
    # Unknown routes (404) and methods (405) answer in the same shapes as every other error.
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
    openai_type = "NotFoundError" if kind == "not_found" else kind
    error = ServedError(
        exc.status_code, str(exc.detail), kind, openai_type=openai_type, headers=dict(exc.headers or {})
    )
    return error_response(request.url.path, error)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not a refusal: the client still gets an error in its dialect (the traceback goes to the log).
    _count_failure(request, "internal")
    message = f"Internal server error ({type(exc).__name__}); see the server log"
    error = ServedError(500, message, "internal", openai_type="InternalServerError")
    return error_response(request.url.path, error)


async def _bad_body(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    _count_failure(request, "validation")
    message = f"Failed to deserialize the JSON body into the target type: {where}: {first['msg']}"
    return error_response(request.url.path, invalid_input(message, where))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MergeserveError, _served)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(RequestValidationError, _bad_body)
