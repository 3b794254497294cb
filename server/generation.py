"""What flows between validation, the scheduler and the HTTP layer: a prepared request and its generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.sampling import SamplingParams

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation: tokenized, with its limits resolved."""

    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Generation:
    """A request's output so far; the scheduler thread writes it, readers wait for `finish_reason`."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int | None = None
    prompt_tokens: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    first_token_seconds: float | None = None  # from submission, so it includes queueing, as TTFT does
