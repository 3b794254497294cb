"""`python -m tests.dying_engine serve ...`: the real CLI, with a model thread that dies on a poisoned request.

The decode step of a batch holding a prompt of POISON_LENGTH tokens or more raises (as an out-of-memory would), and
failing that batch raises too, as an emit to a closed event loop does, so the exception escapes the scheduler's
loop. Shorter prompts, boot's warm-up among them, are served as usual.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import torch

from server import cli
from server.engine import batch, scheduler

POISON_LENGTH = 20


def main() -> int:
    real_decode, real_fail = batch.decode_rows, scheduler._Lane.fail
    closed = asyncio.new_event_loop()
    closed.close()

    def decode(model: Any, slab: Any, tokens: torch.Tensor, stack: Any = None, fused: Any = None) -> torch.Tensor:
        if max(slab.lengths[: tokens.shape[0]]) > POISON_LENGTH:
            raise RuntimeError("injected fault: decode step")
        return real_decode(model, slab, tokens, stack, fused)

    def fail(lane: Any, exc: BaseException) -> None:
        for row in lane.rows:
            row.emit = lambda item, gen: closed.call_soon_threadsafe(print, item)
        real_fail(lane, exc)

    batch.decode_rows = decode  # type: ignore[assignment]
    scheduler._Lane.fail = fail  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
