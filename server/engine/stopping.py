"""When a request stops (TGI's StoppingCriteria): its eos token, a stop sequence, or max_new_tokens.

The rules are checked in TGI's order after every token, so a token that is both eos and the last one allowed
finishes as "eos_token", and one that completes a stop sequence on the last allowed step as "stop_sequence".
"""

from __future__ import annotations

import time
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.engine.types import FinishReason, Generation, Token


def eos_ids(tokenizer: PreTrainedTokenizerBase, model: Any) -> set[int]:
    """The ids that end a request: the tokenizer's eos, and every one the model's generation_config names (chat
    models often list several, such as an end-of-turn marker besides the end-of-text one)."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model, "generation_config", None)):
        value: Any = getattr(source, "eos_token_id", source)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class StoppingCriteria:
    """One request's stop rules; call it once per generated token, in order.

    A stop sequence may end inside a token, and a token may complete one that began several tokens earlier, so each
    call looks at the text this token added plus the `longest` characters before it: any occurrence that ends in
    the new text starts at most `longest` characters before it. Matching over that tail, not the whole text, keeps
    the cost per token independent of how long the generation already is.
    """

    def __init__(self, eos_ids: frozenset[int], stop: list[str], max_new_tokens: int) -> None:
        self.eos_ids, self.stop, self.max_new_tokens = eos_ids, stop, max_new_tokens
        self.longest = max((len(s) for s in stop), default=0)
        self.generated = 0
        self.checked = 0  # length of the generated text at the previous call

    def __call__(self, token_id: int, text: str) -> FinishReason | None:
        """token_id: the token just chosen; text: the whole generated text including it (see `Detokenizer.text`)."""
        self.generated += 1
        start, self.checked = max(0, self.checked - self.longest), len(text)
        if token_id in self.eos_ids:
            return "eos_token"
        if any(s in text[start:] for s in self.stop):
            return "stop_sequence"
        if self.generated >= self.max_new_tokens:
            return "length"
        return None


def record_token(gen: Generation, token: Token, stopping: StoppingCriteria, text: str, submitted: float,
                 started: float) -> bool:  # fmt: skip
    """Append one chosen token to `gen` with the text so far, the stop rule's verdict and the timings: inference
    from `started`, first token from `submitted` (TTFT includes queueing). True once the request is finished.

    One step for both engines (the torch scheduler and the vLLM one), so a request ends, and is timed, alike on both.
    """
    gen.tokens.append(token)
    gen.text = text
    gen.finish_reason = stopping(token.id, text)
    now = time.perf_counter()
    gen.inference_seconds = now - started
    if gen.first_token_seconds is None:
        gen.first_token_seconds = now - submitted
    return gen.finish_reason is not None
