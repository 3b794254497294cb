"""`python -m tests.dying_engine serve ...`: the real CLI, with a model thread that dies on a poisoned request.

The decode step of a batch holding a prompt of POISON_LENGTH tokens or more raises (as an out-of-memory would), and
failing that batch raises too once its rows have their error (its bookkeeping failing), so the exception escapes the
scheduler's loop. Shorter prompts, boot's warm-up among them, are served as usual.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from server import cli
from server.engine import batch, scheduler

POISON_LENGTH = 20


def main() -> int:
    real_decode, real_fail = batch.decode_rows, scheduler._Lane.fail

    def decode(model: Any, slab: Any, tokens: torch.Tensor, stack: Any = None, fused: Any = None) -> torch.Tensor:
        if max(slab.lengths[: tokens.shape[0]]) > POISON_LENGTH:
            raise RuntimeError("injected fault: decode step")
        return real_decode(model, slab, tokens, stack, fused)

    def fail(lane: Any, exc: BaseException) -> None:
        real_fail(lane, exc)
        raise RuntimeError("injected fault: failing the batch")

    batch.decode_rows = decode  # type: ignore[assignment]
    scheduler._Lane.fail = fail  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
