"""A certain lower bound on a text's token count from its characters alone, to refuse hopeless inputs cheaply.

A 1 MiB body takes seconds to tokenize; for tokenizers where a character count bounds the tokens, an input that
cannot fit `max_input_tokens` under any tokenization is refused without tokenizing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenFloor:
    """A certain lower bound on how many tokens a text becomes, from its characters alone (see `token_floor`)."""

    longest: int  # the most characters one token can cover: its vocabulary string's length
    dropped: frozenset[str]  # ASCII characters missing from the vocabulary, which tokenize to nothing

    def tokens(self, text: str) -> int:
        counted = len(text) - sum(text.count(c) for c in self.dropped)
        return -(-counted // self.longest)


def token_floor(tokenizer: PreTrainedTokenizerBase) -> TokenFloor | None:
    """The bound for byte-level BPE without a normalizer (GPT-2, SmolLM2, ...); None for any other tokenizer.

    There the pre-tokenizer turns each character into 1-4 byte symbols and drops none; BPE drops only symbols that
    are missing from the vocabulary, so with every continuation byte (0x80-0xBF) present each multi-byte character
    keeps at least one symbol, and only the ASCII characters whose symbol is missing vanish. A token covers at most
    as many symbols as its vocabulary string has, hence at most that many characters; added tokens match their own
    content in the raw text. So tokens >= (characters that are not dropped) / (longest entry), whatever the text.
    A normalizer or another pre-tokenizer can delete any characters, and an added token that strips whitespace can
    absorb any number of them: then no character count bounds the tokens, and every input is tokenized.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, added = spec.get("model") or {}, spec.get("added_tokens") or []
    if spec.get("normalizer") is not None or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        return None
    if model.get("type") != "BPE" or any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def symbols(char: str) -> str:
        return "".join(piece for piece, _ in level.pre_tokenize_str(char))

    # U+0080..U+00BF are 0xC2 followed by each continuation byte.
    if any(symbols(chr(c))[1] not in vocab for c in range(0x80, 0xC0)):
        return None
    dropped = frozenset(chr(c) for c in range(0x80) if symbols(chr(c)) not in vocab)
    return TokenFloor(max([len(token) for token in vocab] + [len(token["content"]) for token in added]), dropped)
