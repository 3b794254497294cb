"""An exported checkpoint loaded with transformers, run through the kernels the engine serves with.

The torch engine packs its linear layers for oneDNN at boot (server.engine.kernels), whose blocked summation order can
round the last bit differently from `F.linear`'s. Tests that compare an export with the served model bit for bit
(equal weights give equal logits only through equal kernels) pack the loaded export the same way first.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import AutoModelForCausalLM

from server.engine.engine import Engine
from server.engine.kernels import prepack_linears


def load_as_served(folder: Path, served: Engine) -> nn.Module:
    """`folder` loaded by transformers, packed if and only if `served` packed its arms."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if served.info.engine.get("prepack_linear"):
        assert prepack_linears(model) > 0
    return model
