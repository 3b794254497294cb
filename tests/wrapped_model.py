"""A served model wrapped by a test, so the test can count, hold or fail its forwards.

The engine reads a few things of a model besides calling it: its config (the KV budget, the attention kind) and the
attention switch. A wrapper answers those for the model it wraps, and nothing else: not its layers, `lm_head` or
`get_base_model`, which would let the engine run the decoder stack layer by layer and never call the wrapper's
forward (server/engine/decoder.py runs that path only for models whose layers it can see).
"""

from __future__ import annotations

from typing import Any

from torch import nn

FORWARDED = frozenset({"config", "set_attn_implementation", "device", "dtype", "generation_config"})


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in FORWARDED:
            return getattr(self.inner, name)
        return super().__getattr__(name)

    def forward(self, **kw: Any) -> Any:
        return self.inner(**kw)
