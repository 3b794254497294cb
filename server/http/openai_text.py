"""The text OpenAI's routes return: a stop string, and anything after it, is left out (OpenAI's and vLLM's rule).

TGI's routes return the stop string (server.engine.stopping ends the request on the token that completes it, and
TGI's clients expect it in `generated_text`); /v1 clients expect the text to end where the stop string begins. The
engine's stop rule is the same for both, so only the text handed to the client differs, and it is cut here.

Streaming cannot take text back once sent, so a stream holds back the end of the text while it could still be the
start of a stop string (vLLM does the same), and releases it as soon as it cannot: a stop string of n characters
delays at most n - 1 characters, and a request without stop strings streams as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.types import FinishReason


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to the occurrence of a stop string that ends first (the one that ended the request: the engine
    checks after every token, so no occurrence can end before it). Without one, `text` unchanged."""
    found = [(i + len(s), i) for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(found)[1]] if found else text


def _held(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string that the next tokens complete."""
    longest = max((len(s) for s in stop), default=0)
    for n in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return n
    return 0


@dataclass
class StopText:
    """One request's returned text, fed the engine's whole generated text after each token -> the part to send now.

    Whatever is returned has been cut with `cut_at_stop` rules, so the concatenated deltas of a stream equal the
    non-streamed answer's text.
    """

    stop: list[str]
    sent: int = 0  # characters of the returned text already handed out

    def final(self, text: str, reason: FinishReason | None) -> str:
        """The whole returned text of a finished request."""
        return cut_at_stop(text, self.stop) if reason == "stop_sequence" else text

    def delta(self, text: str, reason: FinishReason | None) -> str:
        """The text to send after this token: everything new, less what could still start a stop string."""
        ready = self.final(text, reason) if reason is not None else text[: len(text) - _held(text, self.stop)]
        out = ready[self.sent :]
        self.sent = max(self.sent, len(ready))
        return out
