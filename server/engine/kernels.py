"""Serving kernels for the torch engine on CPU: linear layers with oneDNN-prepacked weights.

`F.linear` on a CPU tensor does not reach the best kernel for a decoder's shapes: in bf16 it re-lays-out the weight
for oneDNN's blocked format on every call, and in float32 it takes MKL's sgemm/sgemv. On this project's 2-core
AVX512-BF16 machine a 576 x 1536 bf16 linear ran ~10x longer through `F.linear` than through the same oneDNN kernel
on a weight reordered once, and float32's 576 x 49152 head at 8 rows 14.9 ms against 4.0 ms prepacked
(docs/benchmarks.md, "Serving kernels"). Prepacking does that reorder once at boot; it is what torch.compile's CPU
"freezing" does for linear layers, without the compile. bf16 steps of one or two rows go to ATen's bf16 gemv instead
(`small_rows_scope`), faster still there, so the unpacked weight is kept as well.

Packing changes no arithmetic the model is asked for (oneDNN computes the same dot products in the same dtype; float32
stays IEEE float32, with no bf16/TF32 downconversion; its blocked order may round differently in the last bit, like any
other kernel choice), so served logits are checked, as always, against a plain forward of the served model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from server.load.adapters import has_meta_weights
from server.merge.precision import Linear, LinearProbe

log = logging.getLogger("mergeserve.kernels")

PrepackSetting = Literal["auto", "on", "off"]
# oneDNN picks the packed layout for a batch-size hint; 8 rows (a full decode batch) measured as fast as the exact
# hint at 1 row and at prefill chunks, while a hint of 1 slowed batch-8 steps (docs/benchmarks.md).
_ROWS_HINT = 8
GEMV_MAX_ROWS = 2


def prepack_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN prepacked linear: CPU only; float32, or bf16 on a CPU with native bf16 dot products (avx512_bf16, AMX).

    float16 is left to `F.linear`: oneDNN's fp16 kernels need AVX512-FP16/AMX-FP16, and emulate it elsewhere."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def small_rows_scope(model: nn.Module, rows: int) -> contextlib.AbstractContextManager[None]:
    """The kernel choice for a forward of `rows` query rows: oneDNN off at GEMV_MAX_ROWS rows or fewer on a bf16 CPU
    model, so its matmuls take ATen's bf16 gemv, which reads each weight once with no reorder and ran a one-row
    decode step 1.6x faster than oneDNN here (docs/bench-decode: 34.6 vs 56.2 ms); oneDNN wins from 4 rows up."""
    param = next(model.parameters())
    if rows > GEMV_MAX_ROWS or param.dtype != torch.bfloat16 or param.device.type != "cpu":
        return contextlib.nullcontext()
    return torch.backends.mkldnn.flags(enabled=False)


class PackedLinear(nn.Module):
    """Inference-only `nn.Linear` over a oneDNN-prepacked weight; x: (..., in) -> (..., out).

    It keeps the unpacked weight too, for the few-row bf16 steps that `small_rows_scope` sends to ATen's gemv (and for
    tied embeddings, which share it): twice the linear layers' memory (the demo: 270 MB more in bf16, 540 MB in
    float32, per arm), which buys both kernels their best shapes.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _ROWS_HINT)
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch._C._get_mkldnn_enabled():  # a few-row step in small_rows_scope: ATen's gemv
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)  # (N, in): oneDNN's linear takes 2-D input
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> int:
    """Put `make(layer)` in place of each `nn.Linear` of `model` (PEFT's base layers included, its LoRA A/B not)
    where it returns a module, in place; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.ModuleDict):
            continue  # PEFT's per-adapter A/B: rank-r matmuls, and PEFT reads their .weight on every call
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # exactly nn.Linear: subclasses (quantized, LoRA wrappers) have own forwards
                made = make(child)
                if made is not None:
                    setattr(parent, name, made)
                    replaced += 1
    return replaced


def prepack_linears(model: nn.Module) -> int:
    """Replace the `nn.Linear` layers of `model` by `PackedLinear`s (see `replace_linears`)."""
    return replace_linears(model, PackedLinear)


def should_prepack(arms: dict[str, nn.Module], setting: PrepackSetting) -> bool:
    """Whether `setting` asks for packing these arms here (auto: where supported; on: warns where it cannot).

    Arms with layers offloaded to disk are not packed: their weights are meta tensors that accelerate's hooks fill
    per forward, so there is nothing to reorder at boot (and a packed copy would pin the layer in memory)."""
    param = next(next(iter(arms.values())).parameters())
    supported = prepack_supported(param.dtype, param.device)
    offloaded = any(has_meta_weights(arm) for arm in arms.values())
    if setting == "on" and (offloaded or not supported):
        why = "layers are offloaded to disk" if offloaded else f"{param.dtype} on {param.device.type} has no kernel"
        log.warning("engine.prepack_linear: on, but %s; not packing", why)
    return supported and not offloaded and setting != "off"


def prepack_arms(arms: dict[str, nn.Module]) -> None:
    counts = {name: prepack_linears(arm) for name, arm in arms.items()}
    log.info("prepacked the linear layers for oneDNN: %s", counts)


def linear_probe(setting: PrepackSetting) -> LinearProbe:
    """What `dtype: auto` times for this engine: a linear layer as a served forward runs it (packed as boot would pack
    it for `setting`, and few-row calls in `small_rows_scope`), so the dtype is picked by the kernels it will get."""

    def build(weight: torch.Tensor) -> Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        layer.weight.data = weight
        packs = setting != "off" and prepack_supported(weight.dtype, weight.device)
        served = PackedLinear(layer) if packs else layer

        def run(x: torch.Tensor) -> torch.Tensor:  # x: (tokens, in)
            with small_rows_scope(served, x.shape[0]):
                return cast(torch.Tensor, served(x))

        return run

    return LinearProbe(f"the torch engine's linear kernels (prepack_linear: {setting})", build)
