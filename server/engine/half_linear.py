"""Half-precision linear layers on CPUs without native bf16: the fused-kernel library's `half_linear`
(csrc/half_linear.cpp) in place of `F.linear`.

On an AVX2-only CPU (no AVX512: the znver3 development machine) oneDNN has no bf16 or fp16 kernel, and ATen's own
converts element by element: `F.linear` on bf16/fp16 weights ran at 9-12 GFLOP/s per core at every row count from
1 to 512, so a bf16 decode step was far from reading its weights at memory speed and its prefill chunks 4-5x slower
than float32's. `half_linear` widens 8 weights per instruction and multiplies with FMA in float32: at one row
0.8-1.0x of the machine's read bound and 1.2-1.9x `F.linear`, at 8 rows 3-4.5x (docs/benchmarks.md, "Half-precision
linear layers on AVX2"), and faster at every row count measured up to 512, so every row count of a layer goes to it.

`HalfLinear` holds the layer's own weight and bias Parameters (no copy: the weights' memory is unchanged) and is put
in place of each `nn.Linear` at boot, PEFT's base layers included (their LoRA A/B side path is left as it is).
`engine.fused_kernels` governs it (it is part of that library): auto/on route the layers where oneDNN has no native
kernel for the dtype and the library has the kernel (x86 with AVX2, FMA, F16C); off keeps `F.linear`.

Numerics are ATen's: float32 accumulation of exact products, the bias added in float32, one rounding to the weight's
dtype; only the order of the sums differs (tests/engine/test_half_linear.py bounds the error against float64).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.kernels import prepack_supported, replace_linears
from server.load.adapters import has_meta_weights

log = logging.getLogger("mergeserve.kernels")

HALF = (torch.bfloat16, torch.float16)


class HalfLinear(nn.Module):
    """Inference-only `nn.Linear` through `ops.half_linear`; x: (..., in) -> (..., out), same Parameters."""

    def __init__(self, linear: nn.Linear, op: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear where the kernel does not apply: another dtype (F.linear raises as nn.Linear would), or a forward
        # that records gradients (the kernel has no backward; serving runs under inference_mode).
        if x.dtype != self.weight.dtype or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return self.op(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def half_kernel(ops: Any | None, dtype: torch.dtype, device: torch.device) -> Any | None:
    """The kernel for layers of `dtype` on `device`, or None: not half precision, oneDNN has a native kernel (it is
    prepacked instead), off the CPU, or the library (`ops`, None for fused_kernels: off) was built without it."""
    if ops is None or dtype not in HALF or device.type != "cpu" or prepack_supported(dtype, device):
        return None
    return getattr(ops, "half_linear", None)


def route_half_linears(arms: dict[str, nn.Module], ops: Any | None) -> dict[str, int]:
    """Put `HalfLinear`s in place of the arms' `nn.Linear` layers where `half_kernel` applies; returns how many per
    arm (none for arms with layers offloaded to disk: accelerate's hooks fill their meta weights per forward)."""
    param = next(next(iter(arms.values())).parameters())
    op = half_kernel(ops, param.dtype, param.device)
    if op is None or any(has_meta_weights(arm) for arm in arms.values()):
        return {}
    counts = {name: replace_linears(arm, lambda linear: _half(linear, op)) for name, arm in arms.items()}
    log.info("half-precision linear layers through the fused-kernel library: %s", counts)
    return counts


def _half(linear: nn.Linear, op: Any) -> HalfLinear | None:
    """For a layer the kernel can read in place: a contiguous weight of a half dtype (a transposed view is left)."""
    if linear.weight.dtype in HALF and linear.weight.is_contiguous():
        return HalfLinear(linear, op)
    return None
