"""What flows between validation, the scheduler and the HTTP layer: a prepared request and its generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

from server.engine.sampling import SamplingParams

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
    """A request's output so far. The scheduler thread owns it; readers get a snapshot with each token."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int | None = None
    prompt_tokens: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    first_token_seconds: float | None = None  # from submission, so it includes queueing, as TTFT does


@dataclass
class TextStream:
    """Each new token's text, decoded against a short window of the tokens before it (TGI's offsets scheme).

    Decoding the whole generation at every step costs O(n) per token and O(n^2) per request. Only the tokens since
    the last emitted text are needed for context: byte-level BPE splits multi-byte characters across tokens, and
    SentencePiece decodes a leading space only after a preceding token. While the window decodes to a partial
    character (it ends in U+FFFD) the token's text is empty and the bytes come out with the token that completes it.
    """

    tokenizer: PreTrainedTokenizerBase
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # start of the context window
    read_offset: int = 0  # end of the text already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False)) if ids else ""
