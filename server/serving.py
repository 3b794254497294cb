"""What every generation route shares: TGI-shaped errors, per-request metrics, and opening a token stream.

Routes (TGI's and OpenAI's) validate their own request shape, then call `open_stream`, which submits to the engine
and waits for the first token, so overload and early failures still become proper HTTP status codes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

from server.config import ABConfig
from server.engine import Engine
from server.generation import Generation, PreparedRequest, Token
from server.metrics import Metrics
from server.scheduler import Overloaded

TokenStream = AsyncIterator[tuple[Token, Generation]]


class ServedError(Exception):
    """An error answered in TGI's shape: {"error": ..., "error_type": ...}."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


class RequestTimeout(Exception):
    """A request still generating at its deadline (limits.request_timeout_seconds); its slot is freed."""


def generation_failure(exc: BaseException) -> ServedError:
    """TGI's 424 for a request that failed after validation; a timeout says so in its message and error_type."""
    if isinstance(exc, RequestTimeout):
        return ServedError(424, str(exc), "timeout")
    return ServedError(424, f"Request failed during generation: {exc}", "generation")


class ArmChooser:
    """Which arm serves a request: the X-Merge-Mode header if given, else the configured split, seeded.

    The split draws from one seeded generator per app, so the same sequence of requests gets the same arms.
    """

    def __init__(self, arms: list[str], ab: ABConfig) -> None:
        self.arms, self.share = arms, ab.merged
        self.rng = random.Random(ab.seed)

    def choose(self, header: str | None) -> str:
        if header is not None:
            arm = header.strip().lower()
            if arm not in self.arms:
                served = " or ".join(self.arms)
                raise ServedError(
                    422,
                    f"Input validation error: X-Merge-Mode `{header}` is not served here; use {served}",
                    "validation",
                )
            return arm
        if len(self.arms) == 1:
            return self.arms[0]
        return "merged" if self.rng.random() < self.share else "unmerged"


class Tracker:
    """One request's metrics, all labelled by the engine's mode; in-flight is decremented exactly once."""

    def __init__(self, metrics: Metrics, mode: str) -> None:
        self.metrics, self.mode = metrics, mode
        self.start = self.validated = time.perf_counter()
        self.last_token: float | None = None
        self.open = True
        self.queue_seconds: float | None = None  # known once the first token is out
        self.labels = {"mode": mode, "adapter": metrics.adapter}
        metrics.in_flight.labels(**self.labels).inc()

    def _close(self) -> bool:
        was_open, self.open = self.open, False
        if was_open:
            self.metrics.in_flight.labels(**self.labels).dec()
        return was_open

    def token(self, gen: Generation) -> None:
        now = time.perf_counter()
        if self.last_token is None:
            self.metrics.time_to_first_token.labels(**self.labels).observe(now - self.start)
        else:
            self.metrics.inter_token_latency.labels(**self.labels).observe(now - self.last_token)
        self.last_token = now

    def finish(self, gen: Generation) -> None:
        if not self._close():
            return
        m, n = self.metrics, len(gen.tokens)
        m.request_duration.labels(**self.labels).observe(time.perf_counter() - self.start)
        m.queue_duration.labels(**self.labels).observe(gen.queue_seconds)
        m.inference_duration.labels(**self.labels).observe(gen.inference_seconds)
        m.time_per_output_token.labels(**self.labels).observe(gen.inference_seconds / max(n, 1))
        m.prompt_tokens.labels(**self.labels).observe(gen.prompt_tokens)
        m.generated_tokens.labels(**self.labels).observe(n)
        m.requests.labels(**self.labels, finish_reason=gen.finish_reason or "cancelled").inc()

    def fail(self, error_type: str) -> None:
        self.metrics.failures.labels(**self.labels, error_type=error_type).inc()
        self._close()

    def cancelled(self) -> None:
        """The client went away mid-stream: not a failure of ours, but no longer in flight."""
        if self._close():
            self.metrics.requests.labels(**self.labels, finish_reason="cancelled").inc()


async def open_stream(
    engine: Engine, prepared: PreparedRequest, tracker: Tracker, timeout: float | None = None
) -> TokenStream:
    """Submit to the tracker's arm and wait for the first token; later tokens follow through the iterator.

    With a timeout, every wait for a token is bounded by the request's deadline (counted from its arrival); past it
    the engine's stream is closed, which cancels the request and frees its batch slot, and RequestTimeout is raised.
    """
    tokens = engine.stream(prepared, tracker.mode)
    deadline = None if timeout is None else tracker.start + timeout

    async def next_token() -> tuple[Token, Generation]:
        if deadline is None:
            return await anext(tokens)
        try:
            return await asyncio.wait_for(anext(tokens), max(deadline - time.perf_counter(), 0.0))
        except TimeoutError:
            await tokens.aclose()
            raise RequestTimeout(
                f"Request timed out: still generating after {timeout:g}s (limits.request_timeout_seconds)"
            ) from None

    try:
        first = await next_token()
    except Overloaded:
        tracker.fail("overloaded")
        raise ServedError(429, "Model is overloaded", "overloaded") from None
    except Exception as exc:
        error = generation_failure(exc)
        tracker.fail(error.error_type)
        raise error from exc

    tracker.queue_seconds = first[1].queue_seconds

    async def rest() -> TokenStream:
        try:
            tracker.token(first[1])
            yield first
            # Until the engine's stream ends: it stops after the token whose snapshot carries the finish_reason.
            while True:
                try:
                    token, gen = await next_token()
                except StopAsyncIteration:
                    return
                tracker.token(gen)
                yield token, gen
        finally:
            await tokens.aclose()  # a consumer that stops early (client gone) cancels the request now, not at GC

    return rest()


async def run_to_end(stream: TokenStream, tracker: Tracker) -> Generation:
    """Consume a stream for a non-streaming route; a failure after the first token is TGI's 424 too."""
    gen = Generation()
    try:
        async for _, step in stream:
            gen = step
    except Exception as exc:
        error = generation_failure(exc)
        tracker.fail(error.error_type)
        raise error from exc
    finally:
        if tracker.open and gen.finish_reason is None:
            tracker.cancelled()  # the task was cancelled (client gone, or shutdown)
    tracker.finish(gen)
    return gen
