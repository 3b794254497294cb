"""What flows between validation, the scheduler and the HTTP layer: a prepared request, its generation, the
handle that cancels it, and the slots both engines count requests against."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from server.engine.sampling import Alternatives, SamplingParams

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation: tokenized, with its limits resolved."""

    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0  # best alternatives reported with each token (OpenAI's top_logprobs); 0: none

    def check_submittable(self) -> None:
        """Both engines' gate: a prompt of no tokens has no position to predict from, and in a batched forward the
        row's logits would be read at another request's position (validation refuses it first; this is the backstop
        for callers that build requests themselves)."""
        if not self.input_ids:
            raise ValueError("a request needs at least one prompt token; its input_ids are empty")


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool
    top: Alternatives | None = None  # the step's best alternatives, when the request asked for them


@dataclass
class Generation:
    """A request's output so far. The scheduler thread owns it; readers get a snapshot with each token."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int | None = None
    prompt_tokens: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    first_token_seconds: float | None = None  # from submission, so it includes queueing, as TTFT does


Emit = Callable[[Token | BaseException, Generation], None]


@dataclass
class Handle:
    """The caller's side of a submitted request; `cancel()` frees its batch slot within one decode step.

    A request still waiting in the queue is withdrawn at once, so its max_concurrent_requests slot is free for the
    next submission, not only when the scheduler would next have admitted it (which, with a full batch, is when a
    running request finishes: up to max_new_tokens steps later).
    """

    cancelled: threading.Event = field(default_factory=threading.Event)
    withdraw: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        self.cancelled.set()
        self.withdraw()


class Overloaded(Exception):
    """More requests than max_concurrent_requests: TGI answers 429 "Model is overloaded"."""


class Slots:
    """Unfinished requests, counted against max_concurrent_requests.

    A request gives its slot back before its last token is emitted, so a client that sends its next request as soon
    as it has an answer never finds its own finished request still counted.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.lock = threading.Lock()

    def take(self) -> None:
        with self.lock:
            if self.used >= self.limit:
                raise Overloaded("Model is overloaded")
            self.used += 1

    def give_back(self) -> None:
        with self.lock:
            self.used -= 1
