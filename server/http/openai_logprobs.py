"""Log-probabilities in OpenAI's two shapes: legacy completions' parallel lists, and chat's per-token objects.

Both are built from the engine's `Token`s: the chosen token's logprob is the log-softmax the engine sampled from, its
alternatives come from the same tensor (`TokenChooser`), so nothing here recomputes a probability. A token's text is
the tokenizer's decode of that one id (TGI's token text), not the streamed text: a byte-level BPE token that holds
half a character streams as "" but is still a token with a logprob, and a client counts tokens by these entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.engine.types import Token

Decode = Callable[[int], str]


def token_decoder(tokenizer: PreTrainedTokenizerBase) -> Decode:
    """One id's text, special tokens included (an end-of-text token is a returned token like any other)."""
    return lambda token_id: str(tokenizer.decode([token_id], skip_special_tokens=False))


@dataclass
class CompletionLogprobs:
    """/v1/completions' `logprobs` object, built chunk by chunk so a stream and a whole answer give the same lists.

    `k` is the request's `logprobs`: None asks for nothing, 0 for the chosen tokens only (no `top_logprobs`), k > 0
    for the k best alternatives too, plus the chosen token if it is not among them, as OpenAI documents ("up to
    logprobs+1 elements"). `offset` is where the next token's text starts in `choices[].text`.
    """

    decode: Decode
    k: int | None
    offset: int = 0

    def of(self, tokens: Iterable[Token]) -> dict[str, Any] | None:
        if self.k is None:
            return None
        texts: list[str] = []
        logprobs: list[float] = []
        offsets: list[int] = []
        tops: list[dict[str, float]] = []
        for token in tokens:
            text = self.decode(token.id)
            texts.append(text)
            logprobs.append(token.logprob)
            offsets.append(self.offset)
            # The returned text leaves special tokens out, so they take no room in it.
            self.offset += 0 if token.special else len(token.text)
            top = {self.decode(i): lp for i, lp in token.top or ()}
            tops.append(top if text in top else {**top, text: token.logprob})
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops if self.k else None,
                "text_offset": offsets}  # fmt: skip


def _entry(text: str, logprob: float) -> dict[str, Any]:
    # `bytes` lets a client rebuild characters that one token's text cannot hold whole.
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(decode: Decode, wanted: bool, tokens: Iterable[Token]) -> dict[str, Any] | None:
    """/v1/chat/completions' `logprobs` object: each token with exactly its requested alternatives (maybe none)."""
    if not wanted:
        return None
    content = [
        {**_entry(decode(t.id), t.logprob), "top_logprobs": [_entry(decode(i), lp) for i, lp in t.top or ()]}
        for t in tokens
    ]
    return {"content": content}
