"""What every request passes before it reaches a route (shutdown, API key, body size and encoding), and the
X-Merge-Mode header on every answer.

Plain ASGI middleware rather than BaseHTTPMiddleware, which would buffer server-sent events and hide client
disconnects. Refusals are answered in the route's own error shape (`server.http.errors` chooses it).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.auth import KeyChecker
from server.http.errors import ServedError, error_response

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
    # OpenAI's clients expect 400 for a request they can fix, where TGI says 422.
    openai_status, openai_type = 400 if status == 422 else status, OPENAI_KINDS.get(status, "BadRequestError")
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    error = ServedError(status, message, error_type, openai_status=openai_status, openai_type=openai_type,
                        headers=headers)  # fmt: skip
    return error_response(path, error)


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


class ModeHeader:
    """Every answer says which arm served it, errors included; routes that know better set it themselves."""

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
