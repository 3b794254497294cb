"""What every request passes before it reaches a route: shutdown, API key, body size and encoding.

One plain ASGI middleware rather than BaseHTTPMiddleware, which would buffer server-sent events. Its refusals are
answered in the route's own error shape: TGI's {"error", "error_type"}, or OpenAI's under /v1/.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.auth import KeyChecker
from server.http.openai import openai_error

# /health must answer load balancers whatever happens. The docs (/docs, /redoc, /openapi.json) are not here: with
# keys set they map the API (routes, limits, version) for whoever asks, so they need the key like /info does.
ALWAYS_OPEN = frozenset({"/health"})
NOT_COUNTED = frozenset({"/health", "/metrics"})  # probes and scrapes do not hold a shutdown back
OPENAI_KINDS = {401: "AuthenticationError", 413: "BadRequestError", 422: "BadRequestError", 503: "ServiceUnavailable"}


@dataclass
class Lifecycle:
    """Draining state and the requests in flight; touched only from the event loop thread (and its signal handler)."""

    draining: bool = False
    active: int = 0


def refusal(path: str, status: int, message: str, error_type: str) -> JSONResponse:
    if path.startswith("/v1/"):
        # OpenAI's clients expect 400 for a request they can fix, where TGI says 422.
        response = openai_error(400 if status == 422 else status, message, OPENAI_KINDS.get(status, "BadRequestError"))
    else:
        response = JSONResponse({"error": message, "error_type": error_type}, status_code=status)
    if status == 401:
        response.headers["www-authenticate"] = "Bearer"
    return response


class RequestGuard:
    def __init__(
        self, app: ASGIApp, lifecycle: Lifecycle, keys: KeyChecker, max_body_bytes: int, metrics_need_key: bool
    ) -> None:
        self.app, self.lifecycle, self.keys = app, lifecycle, keys
        self.max_body_bytes, self.metrics_need_key = max_body_bytes, metrics_need_key

    def _needs_key(self, path: str) -> bool:
        if not self.keys.enabled or path in ALWAYS_OPEN:
            return False
        return path != "/metrics" or self.metrics_need_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.lifecycle.draining and path not in NOT_COUNTED:
            await refusal(path, 503, "Server is shutting down", "unhealthy")(scope, receive, send)
            return
        if self._needs_key(path):
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.keys.allows(authorization):
                message = "Missing or invalid API key: send Authorization: Bearer <key>"
                await refusal(path, 401, message, "authentication")(scope, receive, send)
                return
        counted = path not in NOT_COUNTED
        self.lifecycle.active += int(counted)
        try:
            await self._with_body(scope, receive, send)
        finally:
            self.lifecycle.active -= int(counted)

    async def _with_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        path, limit = scope["path"], self.max_body_bytes
        too_large = f"Request body is larger than {limit} bytes (security.max_body_bytes)"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await refusal(path, 413, too_large, "validation")(scope, receive, send)
            return
        # Read the body here, so a large one is cut off at the limit instead of after it is all in memory.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await refusal(path, 413, too_large, "validation")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            message_text = (
                f"Failed to deserialize the JSON body into the target type: not valid UTF-8 at byte {exc.start}"
            )
            await refusal(path, 422, message_text, "validation")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the app the body read above, then the real receive (which reports the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
