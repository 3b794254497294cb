"""Incremental detokenizing (TGI's offsets scheme, vLLM's IncrementalDetokenizer): each token's text as it comes.

Decoding the whole generation at every step costs O(n) per token and O(n^2) per request. `TextStream` decodes each
new token against a short window of the tokens before it instead; `Detokenizer` adds what a request needs on top:
the `Token` a client sees, and the generated text that stop sequences are matched against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from server.engine.sampling import Alternatives
from server.engine.types import Token


@dataclass
class TextStream:
    """Each new token's text, decoded against a short window of the tokens before it (TGI's offsets scheme).

    Only the tokens since the last emitted text are needed for context: byte-level BPE splits multi-byte characters
    across tokens, and SentencePiece decodes a leading space only after a preceding token. While the window decodes
    to a partial character (it ends in U+FFFD) the token's text is empty and the bytes come out with the token that
    completes it.
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


class Detokenizer:
    """One request's chosen ids -> the `Token`s it streams, and its generated text so far.

    A special token (eos, a chat marker) keeps its text on its `Token`, as TGI streams it, but adds nothing to the
    generated text: TGI's stop sequences never match inside one, and the final answer is decoded without them.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, special_ids: frozenset[int]) -> None:
        self.stream = TextStream(tokenizer)
        self.special_ids = special_ids
        self.text = ""

    def push(self, token_id: int, logprob: float, top: Alternatives | None = None) -> Token:
        special = token_id in self.special_ids
        token = Token(token_id, self.stream.push(token_id), logprob, special, top)
        if not special:
            self.text += token.text
        return token
