"""What every generation route shares: choosing the arm, validating, opening a token stream, tracking metrics.

Routes (TGI's and OpenAI's) map their request onto TGI's parameters and call `start`, which validates, submits to the
engine and waits for the first token, so overload and early failures still become proper HTTP status codes. Every
route then reads its tokens through `tracked`, the one place a request's end (finished, failed) is recorded.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, aclosing
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

from fastapi import Request
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from server.config.schema import ABConfig, Config
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import Generation, Overloaded, PreparedRequest, Token
from server.http.errors import RequestTimeout, ServedError, error_event, generation_failure, invalid_input
from server.http.metrics import Metrics
from server.http.tgi_protocol import Parameters
from server.http.validation import InputValidationError, validate

T = TypeVar("T")


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
    """One request's metrics, all labelled by the engine's mode; in-flight is decremented exactly once.

    A context manager: whoever opens one holds it in a `with` (or an exit stack handed on to the response), so every
    way out closes it. A leaked +1 on the in-flight gauge is permanent, and an autoscaler scales on that gauge.
    """

    def __init__(self, metrics: Metrics, mode: str) -> None:
        self.metrics, self.mode = metrics, mode
        self.start = self.validated = time.perf_counter()
        self.last_token: float | None = None
        self.open = True
        self.queue_seconds: float | None = None  # known once the first token is out
        self.labels = {"mode": mode, "adapter": metrics.adapter}
        metrics.requests_in_flight.labels(**self.labels).inc()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.open:  # finished, or failed with its own error_type, on the way out
            return
        if isinstance(exc, ServedError):
            self.fail(exc.error_type)
        elif exc is None or not isinstance(exc, Exception):
            self.cancelled()  # the response ended before the last token, or the task was cancelled: client gone
        else:
            self._close()  # a bug: the app's 500 handler counts it as "internal"

    def _close(self) -> bool:
        was_open, self.open = self.open, False
        if was_open:
            self.metrics.requests_in_flight.labels(**self.labels).dec()
        return was_open

    def token(self, gen: Generation) -> None:
        now = time.perf_counter()
        if self.last_token is None:
            self.metrics.time_to_first_token_seconds.labels(**self.labels).observe(now - self.start)
        else:
            self.metrics.inter_token_latency_seconds.labels(**self.labels).observe(now - self.last_token)
        self.last_token = now

    def finish(self, gen: Generation) -> None:
        if not self._close():
            return
        m, n = self.metrics, len(gen.tokens)
        m.request_duration_seconds.labels(**self.labels).observe(time.perf_counter() - self.start)
        m.request_queue_duration_seconds.labels(**self.labels).observe(gen.queue_seconds)
        m.request_inference_duration_seconds.labels(**self.labels).observe(gen.inference_seconds)
        m.request_time_per_output_token_seconds.labels(**self.labels).observe(gen.inference_seconds / max(n, 1))
        m.request_prompt_tokens.labels(**self.labels).observe(gen.prompt_tokens)
        m.request_generated_tokens.labels(**self.labels).observe(n)
        m.requests.labels(**self.labels, finish_reason=gen.finish_reason or "cancelled").inc()

    def fail(self, error_type: str) -> None:
        self.metrics.request_failures.labels(**self.labels, error_type=error_type).inc()
        self._close()

    def cancelled(self) -> None:
        """The client went away mid-stream: not a failure of ours, but no longer in flight."""
        if self._close():
            self.metrics.requests.labels(**self.labels, finish_reason="cancelled").inc()


class TokenStream:
    """A submitted request's tokens, the first already received. `aclose()` cancels the request and frees its batch
    slot whether or not iteration began: an async generator closed before its first step never runs its finally.
    """

    def __init__(
        self, rest: AsyncGenerator[tuple[Token, Generation], None], engine_stream: AsyncGenerator[Any, None]
    ) -> None:
        self._rest, self._engine_stream = rest, engine_stream

    def __aiter__(self) -> AsyncIterator[tuple[Token, Generation]]:
        return self._rest

    async def aclose(self) -> None:
        await self._rest.aclose()
        await self._engine_stream.aclose()


class OwnedEvents(EventSourceResponse):
    """Server-sent events that close what their route opened (tracker, token stream) when the response ends.

    The route returns before the first event is sent, so its own `with` cannot cover the stream; this response
    takes the exit stack over and closes it however it ends: finished, failed, or the client gone before the first
    event (then the events generator never started, and its own cleanup would never run).
    """

    def __init__(self, events: AsyncGenerator[str, None], owned: AsyncExitStack, headers: dict[str, str]) -> None:
        super().__init__(events, headers=headers, sep="\n")
        owned.push_async_callback(events.aclose)
        self.owned = owned

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.owned:
            await super().__call__(scope, receive, send)


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run a non-streaming request, cancelling it as soon as its client hangs up.

    Starlette never cancels an endpoint whose client left, so a hung-up request would keep its batch slot for up to
    max_new_tokens decode steps (or request_timeout_seconds). Cancelling the work closes its token stream, which
    cancels the request in the scheduler before its next step. Streaming responses need none of this: they watch
    for the disconnect themselves. The 499 (nginx's "client closed request") is for the log; nobody reads it.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        # The body was read already (RequestGuard replays it), so the next message is the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if watcher.done() and not watcher.cancelled() and not (current and current.cancelling()):
            raise ServedError(499, "Client closed the request before the answer was ready", "cancelled") from None
        raise
    finally:
        watcher.cancel()


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
            # Not asyncio.wait_for: on 3.11 it drops a cancellation that lands as the token arrives, and then a client
            # that hung up at that moment would keep its request generating (see until_disconnect).
            async with asyncio.timeout(max(deadline - time.perf_counter(), 0.0)):
                return await anext(tokens)
        except TimeoutError:
            await tokens.aclose()
            raise RequestTimeout(
                f"Request timed out: still generating after {timeout:g}s (limits.request_timeout_seconds)"
            ) from None

    try:
        first = await next_token()
    except Overloaded:
        raise ServedError(429, "Model is overloaded", "overloaded") from None
    except Exception as exc:
        raise generation_failure(exc) from exc

    tracker.queue_seconds = first[1].queue_seconds

    async def rest() -> AsyncGenerator[tuple[Token, Generation], None]:
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

    return TokenStream(rest(), tokens)


async def tracked(stream: TokenStream, tracker: Tracker) -> AsyncGenerator[tuple[Token, Generation], None]:
    """The stream's tokens, with its end recorded: finished, or failed as TGI's 424 (raised, for the route to answer).

    A consumer that stops early (client gone) leaves the tracker open, and the route's owner closes it as cancelled.
    """
    gen = Generation()
    try:
        async for token, gen in stream:
            yield token, gen
    except Exception as exc:
        error = generation_failure(exc)
        tracker.fail(error.error_type)
        raise error from exc
    tracker.finish(gen)


async def run_to_end(stream: TokenStream, tracker: Tracker) -> Generation:
    """Consume a stream for a non-streaming route."""
    gen = Generation()
    async for _, step in tracked(stream, tracker):
        gen = step
    return gen


def events(
    path: str,
    chunks: AsyncGenerator[dict[str, Any], None],
    owner: AsyncExitStack,
    headers: dict[str, str],
    done: str | None = None,
) -> OwnedEvents:
    """Server-sent events of `chunks`, ending in an error event if generation fails after the 200, then `done`."""

    async def lines() -> AsyncGenerator[str, None]:
        try:
            async for chunk in chunks:
                yield json.dumps(chunk)
        except ServedError as exc:
            yield error_event(path, exc)
        if done is not None:
            yield done

    owner.push_async_callback(chunks.aclose)
    return OwnedEvents(lines(), owner, headers)


def served_adapter(config: Config) -> str:
    """The adapter set's name, as /info, the metrics and `adapter_id` know it: e.g. "pirate+legal"."""
    return "+".join(a.name for a in config.adapters)


def current_engine(request: Request) -> Engine:
    engine: Engine | None = request.app.state.engine
    if engine is None:
        raise ServedError(503, "Model is loading", "healthcheck")
    return engine


def current_arm(request: Request) -> str:
    chooser: ArmChooser = request.app.state.arms
    return chooser.choose(request.headers.get("x-merge-mode"))


async def start(
    request: Request,
    inputs: str,
    parameters: Parameters,
    owner: AsyncExitStack,
    chat: bool = False,
    top_logprobs: int = 0,
    sampling: Callable[[SamplingParams], SamplingParams] | None = None,
) -> tuple[Engine, Tracker, TokenStream]:
    """Validate, submit and open the request's tracker and token stream on `owner`, which closes both however the
    request ends (a ServedError on the way out is recorded by the tracker). `top_logprobs` and `sampling` (a change
    of the validated `SamplingParams`): OpenAI options that TGI's parameters do not carry (TGI's `top_n_tokens` stays
    refused)."""
    engine, config = current_engine(request), request.app.state.config
    tracker = owner.enter_context(Tracker(request.app.state.metrics, current_arm(request)))
    # A chat template already holds its special tokens; adding BOS again would change the prompt.
    tokenize: Callable[[str], list[int]] = (
        (lambda text: engine.tokenizer(text, add_special_tokens=False).input_ids) if chat else engine.tokenize
    )
    args = (inputs, parameters, tokenize, config.limits, served_adapter(config), engine.token_floor)
    try:
        prepared = await run_in_threadpool(validate, *args)  # tokenizing a 1 MiB body takes seconds
    except InputValidationError as exc:
        raise invalid_input(str(exc)) from None
    params = sampling(prepared.params) if sampling is not None else prepared.params
    prepared = replace(prepared, top_logprobs=top_logprobs, params=params)
    if (problem := engine.unsupported(prepared)) is not None:
        raise invalid_input(problem)
    tracker.validated = time.perf_counter()
    stream = await open_stream(engine, prepared, tracker, config.limits.request_timeout_seconds)
    return engine, tracker, await owner.enter_async_context(aclosing(stream))
