"""Did the merge store W0 + delta, element by element, up to the one rounding the serving dtype forces?

The merge forms W0 + delta in float32 and rounds once to the serving dtype (round to nearest). So for every element

    |W_stored - (W0 + delta)|  <=  half the dtype's spacing at W_stored  +  float32's own rounding

and nothing looser is needed. The spacing is 2^-7 relative for bfloat16 (8 significant bits: half a spacing is
2^-8 = 0.39 % of the value at worst), 2^-10 for float16 and 2^-23 for float32; below the smallest normal number it is
the fixed subnormal step. float32's part covers forming the sum and this check's own subtractions: at most 2^-24
relative per operation, bounded by 2^-23 * (|W_stored| + |W0| + |delta|).

Why per element and not ||W - W0 - delta|| <= c ||delta||: an adapter's delta is often below 0.2 % of |W0| (see
docs/merge-pitfalls), where bf16 rounding alone leaves a residual as large as the delta itself, so any norm ratio
that passes honest bf16 merges also passes a merge that wrote one element (measured on the demo pair: README,
"Precision"). The element-wise bound is exact for a correct merge in any dtype, and an element that was not written,
written twice or written in the wrong place is off by its whole delta, which is far outside it wherever the delta is
larger than the rounding. Where it is not, a missing write is indistinguishable from rounding and also harmless.

A delta that rounds away on every element passes that bound but leaves the model unadapted: it is refused separately.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from server.errors import Refusal

# float32's unit roundoff is 2^-24; two of them cover forming W0 + delta and the residual's subtractions.
_FLOAT32_SLACK = 2.0**-23
_FLOAT32_MAX = torch.finfo(torch.float32).max
# Elements per step of the check: its float32 temporaries (about six) stay at 1 MiB each, in cache, however large
# the weight (a 4096 x 14336 projection is 235 MB per float32 copy; the whole-tensor check held several at once).
CHUNK = 1 << 18
# (integer type of the same width, explicit mantissa bits) for the dtypes whose spacing is read off the bits.
_LAYOUT: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 7),
    torch.float16: (torch.int16, 10),
    torch.float32: (torch.int32, 23),
}


def half_spacing(stored: torch.Tensor) -> torch.Tensor:
    """Half the gap between adjacent values of `stored`'s dtype at each stored value, in float32.

    For |x| in [2^k, 2^(k+1)) the gap is 2^k * 2^-m (m explicit mantissa bits): 2^k is x with its sign and mantissa
    bits cleared, read off the bits with two integer ops. Subnormals and zero (exponent field 0) have the step of the
    smallest normal, so the field is raised to 1; inf and NaN (field all ones) are lowered to the largest finite
    binade, so a weight that overflowed gets a finite bound and is caught. Exact: a power of two converts to float32
    exactly, and scaling it by 2^-(m+1) is exact down to float32's subnormals (float32 itself: 2^-150 rounds to 0,
    as the frexp formula it replaces gave). Other dtypes take that formula (frexp on a float32 copy).
    """
    if stored.dtype not in _LAYOUT:
        return _frexp_half_spacing(stored)
    int_dtype, mantissa = _LAYOUT[stored.dtype]
    field = torch.finfo(stored.dtype).bits - 1 - mantissa  # exponent bits
    exponent = ((1 << field) - 1) << mantissa
    lowest, highest = 1 << mantissa, exponent - (1 << mantissa)  # exponent fields 1 and all-ones - 1, mantissa 0
    binade = stored.detach().view(int_dtype).bitwise_and(exponent).clamp(lowest, highest)
    binade = binade.view(stored.dtype).float()
    return binade * 2.0 ** -(mantissa + 1)


def _frexp_half_spacing(stored: torch.Tensor) -> torch.Tensor:
    info = torch.finfo(stored.dtype)
    x = stored.detach().float().abs()
    _, exponent = torch.frexp(x)
    gap = torch.ldexp(torch.full_like(x, info.eps), exponent - 1)
    gap = torch.where(x < info.smallest_normal, torch.full_like(x, info.smallest_normal * info.eps), gap)
    return gap / 2


@contextmanager
def _one_thread() -> Iterator[None]:
    """The calling thread's torch ops on one thread (torch.set_num_threads is per thread under OpenMP).

    Each op on a chunk is too small to pay for a parallel region, and on a busy machine a region waits for its
    descheduled worker: a 2048 x 8192 bf16 check took 7.3 s (1.9 s CPU) on 2 threads and 0.79 s (0.16 s CPU) on
    one, against 8.6 s (1.7 s CPU) for the whole-tensor frexp check (shared 2-core machine, load ~9). The check
    reads each weight once and is bound by memory bandwidth, which one core nearly saturates.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_problem(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> Refusal | None:
    """None if `after` is `before + delta` rounded once to `after`'s dtype; else what is wrong, with the fix.

    `before` and `after` are the stored tensors (any dtype, same shape); `delta` is the float32 change the adapters
    imply. Checked CHUNK elements at a time. A stored NaN or inf (an overflow) counts as wrong, where the former
    whole-tensor check let both through (a NaN residual and an infinite bound compare false).
    """
    b, a, d = (t.detach().reshape(-1) for t in (before, after, delta.to(after.device, torch.float32)))
    with _one_thread():
        return _chunked_problem(b, a, d, after.dtype)


def _chunked_problem(
    before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype
) -> Refusal | None:
    wrong, changed, moves = 0, False, False
    worst: tuple[float, float, float] = (-math.inf, 0.0, 0.0)  # (excess over the bound, residual, delta)
    for start in range(0, before.numel(), CHUNK):
        b, a, d = (t[start : start + CHUNK] for t in (before, after, delta))
        w0, w = b.float(), a.float()
        residual = (w - w0) - d
        bound = half_spacing(a) + _FLOAT32_SLACK * (w.abs() + w0.abs() + d.abs())
        # A stored inf would make its own bound infinite; a NaN residual compares false: both count as wrong.
        bad = ~(residual.abs() <= bound.clamp_max(_FLOAT32_MAX))
        count = int(bad.sum())
        if count:
            wrong += count
            excess = torch.where(bad, (residual.abs() - bound).nan_to_num(math.inf), -math.inf)
            at = int(excess.argmax())
            if excess[at].item() > worst[0]:
                worst = (excess[at].item(), residual[at].item(), d[at].item())
        changed = changed or not torch.equal(b, a)
        moves = moves or bool(d.any())
    if wrong:
        return Refusal(
            f"{wrong} of {before.numel()} elements differ from W0 + delta by more than one rounding to "
            f"{dtype} (worst: off by {worst[1]:.3g}, delta {worst[2]:.3g})",
            "report this as a bug",
        )
    if moves and not changed:
        return Refusal(f"it did not change: the delta rounds away entirely in {dtype}", "serve in float32 or unmerged")
    return None
