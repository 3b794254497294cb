"""Serving kernels for the torch engine on CPU: linear layers with oneDNN-prepacked weights.

`F.linear` on a CPU tensor does not reach the best kernel for a decoder's shapes: in bf16 it re-lays-out the weight
for oneDNN's blocked format on every call, and in float32 it takes MKL's sgemm/sgemv. On this project's 2-core
AVX512-BF16 machine a 576 x 1536 bf16 linear ran ~10x longer through `F.linear` than through the same oneDNN kernel
on a weight reordered once, and float32's 576 x 49152 head at 8 rows 14.9 ms against 4.0 ms prepacked
(docs/benchmarks.md, "Serving kernels"). Prepacking does that reorder once at boot; it is what torch.compile's CPU
"freezing" does for linear layers, without the compile.

One copy: the packed weight replaces the plain one, whose memory is given back (server.engine.weight_release), so
packing costs one layer at a time, not a second model (issue 27: a 1.07B bf16 merge peaked at 4.94 GiB, 2.47x its
weights, keeping both). What that costs in speed, measured on the 1.07B shape's seven decoder projections in bf16
on the 2-core AVX512-BF16 EPYC (medians of 30): at 1 row the packed oneDNN kernel took 6.18 ms against 6.30 ms for
ATen's gemv on the plain weight, at 2 rows 6.38 against 8.44 (and 7.79 for `F.linear`), at 8 rows 6.32 against
9.34 for `F.linear`: the packed kernel is as fast or faster at every row count, so the plain copy bought nothing.

Packing changes no arithmetic the model is asked for (oneDNN computes the same dot products in the same dtype; float32
stays IEEE float32, with no bf16/TF32 downconversion; its blocked order may round differently in the last bit, like any
other kernel choice), so served logits are checked, as always, against a plain forward of the served model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import nn

from server.engine.weight_release import FileMappings, release
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
    model, so its matmuls on plain weights (LoRA's A and B, layers left unpacked) take ATen's bf16 gemv, which reads
    each weight once with no reorder: `F.linear` through oneDNN re-lays-out the weight on every call, and a one-row
    decode step of an unpacked model ran 1.6x faster with gemv (docs/bench-decode: 34.6 vs 56.2 ms). Packed layers
    are not affected (`PackedLinear`)."""
    param = next(model.parameters(), None)  # None: a lone PackedLinear without bias, which the flags do not affect
    if rows > GEMV_MAX_ROWS or param is None or param.dtype != torch.bfloat16 or param.device.type != "cpu":
        return contextlib.nullcontext()
    return torch.backends.mkldnn.flags(enabled=False)


class PackedLinear(nn.Module):
    """Inference-only `nn.Linear` over a oneDNN-prepacked weight; x: (..., in) -> (..., out).

    It holds the packed weight only (see the module docstring), at every row count: ATen's kernels cannot read the
    blocked layout, so `small_rows_scope` leaves it alone (oneDNN's op runs whatever the flags say).
    """

    def __init__(self, linear: nn.Linear, packed: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed, self.bias = packed, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in): oneDNN's linear takes 2-D input
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The plain (out, in) weight, unpacked from the bytes that are served: a new copy per call, for inspection
        and state dicts (oneDNN's reorder is a permutation: unpacking returns the plain tensor bit for bit)."""
        return self.packed.to_dense()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight  # where nn.Linear saves it
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> int:
    """Put `make(layer)` in place of each `nn.Linear` of `model` (PEFT's base layers included, its LoRA A/B not)
    where it returns a module, in place; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.ModuleDict):
            continue  # PEFT's per-adapter A/B: rank-r matmuls, and PEFT reads their .weight on every call
        if any(getattr(parent, "use_dora", {}).values()):
            continue  # a DoRA layer reads its base layer's weight directly, to rescale by its column norms
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # exactly nn.Linear: subclasses (quantized, LoRA wrappers) have own forwards
                made = make(child)
                if made is not None:
                    setattr(parent, name, made)
                    replaced += 1
    return replaced


def prepack_linears(model: nn.Module) -> int:
    """Replace the `nn.Linear` layers of `model` by `PackedLinear`s (see `replace_linears`), giving back the plain
    weights no other module reads; returns how many were replaced."""
    return prepack_arms({"model": model}, quiet=True)["model"]


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


def _holders(arms: dict[str, nn.Module]) -> dict[int, set[int]]:
    """weight address -> the modules (by id) across all arms that hold a tensor there directly: a tied embedding,
    or the `ab` twin's unadapted layers, share it with a linear layer."""
    holders: dict[int, set[int]] = {}
    for arm in arms.values():
        for module in arm.modules():
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None and tensor.numel():
                    holders.setdefault(tensor.data_ptr(), set()).add(id(module))
    return holders


def prepack_arms(arms: dict[str, nn.Module], quiet: bool = False) -> dict[str, int]:
    """Pack every arm's linear layers, each weight once (arms that share a weight share its packed copy), and give
    back each plain weight as soon as every module holding it has been replaced: peak memory grows by one layer."""
    holders = _holders(arms)
    packed: dict[int, torch.Tensor] = {}
    replaced: dict[int, set[int]] = {}
    mappings = FileMappings.read()
    released = [0, 0]  # weights, bytes of file mappings advised away

    def make(linear: nn.Linear) -> PackedLinear:
        weight = linear.weight
        at = weight.data_ptr()
        if at not in packed:
            packed[at] = pack(weight)
        layer = PackedLinear(linear, packed[at])
        replaced.setdefault(at, set()).add(id(linear))
        if replaced[at] == holders.get(at):
            released[1] += release(weight, mappings)
            released[0] += 1
        return layer

    counts = {name: replace_linears(arm, make) for name, arm in arms.items()}
    if not quiet:
        log.info("prepacked the linear layers for oneDNN: %s; gave back %d plain weights (%.2f GiB of mapped files "
                 "unmapped)", counts, released[0], released[1] / 2**30)  # fmt: skip
    return counts


def linear_probe(setting: PrepackSetting) -> LinearProbe:
    """What `dtype: auto` times for this engine: a linear layer as a served forward runs it (packed as boot would pack
    it for `setting`, and few-row calls in `small_rows_scope`), so the dtype is picked by the kernels it will get."""

    def build(weight: torch.Tensor) -> Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        layer.weight.data = weight
        packs = setting != "off" and prepack_supported(weight.dtype, weight.device)
        served = PackedLinear(layer, pack(weight)) if packs else layer

        def run(x: torch.Tensor) -> torch.Tensor:  # x: (tokens, in)
            with small_rows_scope(served, x.shape[0]):
                return cast(torch.Tensor, served(x))

        return run

    return LinearProbe(f"the torch engine's linear kernels (prepack_linear: {setting})", build)
