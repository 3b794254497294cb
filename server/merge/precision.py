"""Precision: which dtype to serve in (`dtype: auto`), and how far the served logits sit from float32.

`pick_dtype` times the serving engine's own linear kernels on decoder-sized shapes in float32 and bfloat16 on the
serving device and keeps bf16 only if it is clearly faster. What is timed decides the answer: one cache-resident
weight through plain `F.linear` picked float32 on this project's AVX512-BF16 CPU, where the torch engine's kernels
run a bf16 decode step 1.9x faster than float32's (docs/benchmarks.md, "dtype"); on an AVX2-only CPU bf16 is
emulated and tens of times slower; on GPUs it is the fast path. bf16 keeps float32's range, so it is safe for any
checkpoint.

What the serving dtype costs is measured against the unmerged model's logits in float32 (server.merge.reference,
one module upcast at a time), and the parity gate holds a half-precision merge to it (server.merge.parity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HALF_MIN_SPEEDUP = 1.2  # a half dtype must beat float32 by this factor to be worth its rounding
# tokens x in x out through a 1024-wide projection: one decode step, and a prefill chunk. Small-M matmuls take other
# kernels than large ones, and decode steps are most of a server's matmuls.
_SHAPES = ((1, 1024, 1024), (32, 1024, 1024))
# A call runs the tokens through this many distinct weights, as a forward runs them through its layers: 8 x 4 MB in
# float32 do not fit a CPU's cache, so a one-token call reads its weights from memory, as a decode step does (timing
# one cache-resident weight let a kernel that is slower in a real model win).
_LAYERS = 8
_ROUNDS, _CALLS = 15, 3

Linear = Callable[[torch.Tensor], torch.Tensor]  # x (tokens, in) -> x @ weight.T (tokens, out)


@dataclass(frozen=True)
class LinearProbe:
    """The kernel a serving engine runs a linear layer with: `build(weight)` prepares it once, as the engine does at
    boot, and returns the function each forward calls."""

    name: str
    build: Callable[[torch.Tensor], Linear]


def _plain(weight: torch.Tensor) -> Linear:
    return lambda x: F.linear(x, weight)


PLAIN_LINEAR = LinearProbe("F.linear", _plain)


def serving_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prepared(
    probe: LinearProbe, dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int]
) -> Callable[[], torch.Tensor]:
    """One call through _LAYERS weights of `shape` in `dtype`, kernels prepared and warmed up."""
    tokens, d_in, d_out = shape
    x = torch.randn(tokens, d_in, device=device).to(dtype)
    layers = [probe.build(torch.randn(d_out, d_in, device=device).to(dtype)) for _ in range(_LAYERS)]

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return torch.stack([layer(x) for layer in layers])  # (_LAYERS, tokens, out)

    for _ in range(2):  # the first calls pay for kernel selection and JIT
        call()
    return call


def _matmul_seconds(
    dtypes: list[str], device: torch.device, shape: tuple[int, int, int], probe: LinearProbe = PLAIN_LINEAR
) -> dict[str, float]:
    """Best-of-rounds time of one call through the probe's kernels per dtype.

    The dtypes take turns within each round, so a neighbour's burst of load hits them alike, and the minimum over
    rounds is the least disturbed measurement.
    """
    calls = {}
    for name in dtypes:
        try:
            calls[name] = _prepared(probe, getattr(torch, name), device, shape)
        except RuntimeError:  # dtype not implemented for this device
            continue
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(_ROUNDS):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(_CALLS):
                call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) / _CALLS)
    return best


def pick_dtype(device: torch.device | None = None, probe: LinearProbe = PLAIN_LINEAR) -> tuple[str, str]:
    """(dtype name, reason): bfloat16 if it is clearly faster than float32 here in the probe's kernels, else float32.

    float16 is never picked automatically: its range (max 65504) overflows activations of models trained in bf16;
    configure it explicitly for a model known to run in it.
    """
    device = device or serving_device()
    decode, prefill = (_matmul_seconds(["float32", "bfloat16"], device, shape, probe) for shape in _SHAPES)
    total = {n: decode[n] + prefill.get(n, float("inf")) for n in decode}
    fp32, bf16 = total["float32"], total.get("bfloat16", float("inf"))
    faster = bf16 * HALF_MIN_SPEEDUP <= fp32 and decode.get("bfloat16", float("inf")) <= decode["float32"]
    chosen = "bfloat16" if faster else "float32"
    measured = "; ".join(
        f"{'x'.join(map(str, shape))}: " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items())
        for shape, times in zip(_SHAPES, (decode, prefill), strict=True)
    )
    if chosen == "float32":
        verdict = f"float32: bfloat16 was not {HALF_MIN_SPEEDUP}x faster at both shapes together"
    else:
        verdict = f"bfloat16: {fp32 / bf16:.1f}x faster than float32"
    kernels = f"{probe.name}, {_LAYERS} weights per call"
    return chosen, f"auto: timed {kernels} on {device.type} ({measured}); chose {verdict}"


def resolve_dtype_setting(setting: str, probe: LinearProbe = PLAIN_LINEAR) -> tuple[str, str]:
    """(dtype to load in, reason) for a configured `model.dtype`; `auto` is measured here, once per boot, in the
    serving engine's kernels (`probe`; the torch engine passes its own, server.engine.kernels.linear_probe).

    Whatever keys or labels the weights must use the result, never "auto": the same config picks float32 on an
    AVX2-only CPU and bfloat16 on one with AMX, and the two merges differ in every rounded weight.
    """
    if setting == "auto":
        return pick_dtype(probe=probe)
    if setting == "checkpoint":
        return setting, "checkpoint: the checkpoint's own dtype"
    return setting, f"configured: {setting}"
