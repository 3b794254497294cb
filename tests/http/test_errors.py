"""One error type, rendered in one place: any refusal raised under a route answers in that route's dialect."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.errors import ExitCode, MergeserveError
from server.http.errors import ServedError, install_handlers
from server.merge.apply import MergeError


def _app(exc: Exception) -> TestClient:
    app = FastAPI()
    install_handlers(app)

    async def fail() -> None:
        raise exc

    app.add_api_route("/generate", fail, methods=["POST"])
    app.add_api_route("/v1/completions", fail, methods=["POST"])
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("exc", "tgi", "openai"),
    [
        (MergeserveError("no such file", "point at it", "model.path"), (422, "validation"), (400, "BadRequestError")),
        (MergeError("weight did not change", "serve float32"), (503, "unavailable"), (503, "ServiceUnavailableError")),
        (MergeserveError("bug", "", exit_code=ExitCode.UNEXPECTED), (500, "internal"), (500, "InternalServerError")),
        (ServedError(429, "Model is overloaded", "overloaded"), (429, "overloaded"), (429, "overloaded")),
    ],
)
def test_a_refusal_answers_in_each_dialect(exc: MergeserveError, tgi: tuple[int, str], openai: tuple[int, str]) -> None:
    client = _app(exc)
    r = client.post("/generate")
    assert (r.status_code, r.json()["error_type"]) == tgi
    assert r.json()["error"] == exc.line()
    r = client.post("/v1/completions")
    body = r.json()["error"]
    assert (r.status_code, body["type"]) == openai and body["code"] == openai[0]
    assert body["message"] == exc.line()


def test_a_served_error_keeps_tgis_exact_message() -> None:
    exc = ServedError(422, "Input validation error: `top_p` must be > 0.0 and < 1.0", "validation")
    assert exc.line() == exc.message and str(exc) == exc.message
