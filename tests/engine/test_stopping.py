"""The stop rules against a brute-force reference: a stop sequence is found as soon as the whole text contains it."""

from __future__ import annotations

import random

from server.engine.stopping import StoppingCriteria

EOS = 0


def _first_stop(pieces: list[str], stop: list[str]) -> int | None:
    """Reference: the first token after which the whole generated text so far contains a stop sequence."""
    for i in range(len(pieces)):
        if any(s in "".join(pieces[: i + 1]) for s in stop):
            return i
    return None


def test_stop_sequences_are_found_across_token_boundaries() -> None:
    rng = random.Random(0)
    found_split = 0
    for _ in range(2000):
        # Short pieces over a small alphabet: stop sequences often span several tokens, and some pieces are empty
        # (a partial character, or a special token, adds no text).
        pieces = ["".join(rng.choices("ab", k=rng.randint(0, 3))) for _ in range(12)]
        stop = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 2))]
        criteria, text, reasons = StoppingCriteria(frozenset({EOS}), stop, max_new_tokens=100), "", []
        for piece in pieces:
            text += piece
            reasons.append(criteria(1, text))
        want = _first_stop(pieces, stop)
        got = next((i for i, r in enumerate(reasons) if r is not None), None)
        assert got == want, (pieces, stop, reasons)
        assert got is None or reasons[got] == "stop_sequence"
        found_split += want is not None and not any(s in pieces[want] for s in stop)
    assert found_split > 100  # many stops did span token boundaries, so the tail window was exercised


def test_eos_then_stop_sequence_then_length() -> None:
    """TGI's order: a token that is eos and also the last one allowed finishes as eos_token."""
    assert StoppingCriteria(frozenset({EOS}), ["x"], max_new_tokens=1)(EOS, "x") == "eos_token"
    assert StoppingCriteria(frozenset({EOS}), ["x"], max_new_tokens=1)(1, "x") == "stop_sequence"
    criteria = StoppingCriteria(frozenset({EOS}), [], max_new_tokens=3)
    assert [criteria(1, "y" * n) for n in range(1, 4)] == [None, None, "length"]
