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

import torch

from server.errors import Refusal

# float32's unit roundoff is 2^-24; two of them cover forming W0 + delta and the residual's subtractions.
_FLOAT32_SLACK = 2.0**-23


def half_spacing(stored: torch.Tensor) -> torch.Tensor:
    """Half the gap between adjacent values of `stored`'s dtype at each stored value, in float32.

    For |x| in [2^(e-1), 2^e) the gap is eps * 2^(e-1) (frexp gives e); subnormals and zero have the fixed step
    smallest_normal * eps.
    """
    info = torch.finfo(stored.dtype)
    x = stored.detach().float().abs()
    _, exponent = torch.frexp(x)
    gap = torch.ldexp(torch.full_like(x, info.eps), exponent - 1)
    gap = torch.where(x < info.smallest_normal, torch.full_like(x, info.smallest_normal * info.eps), gap)
    return gap / 2


def write_problem(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> Refusal | None:
    """None if `after` is `before + delta` rounded once to `after`'s dtype; else what is wrong, with the fix.

    `before` and `after` are the stored tensors (any dtype, same shape); `delta` is the float32 change the adapters
    imply. The float32 temporaries are the size of the merge's own.
    """
    w0, w = before.detach().float(), after.detach().float()
    delta = delta.to(w.device, torch.float32)
    residual = (w - w0) - delta
    bound = half_spacing(after) + _FLOAT32_SLACK * (w.abs() + w0.abs() + delta.abs())
    wrong = residual.abs() > bound
    if bool(wrong.any()):
        worst = int((residual.abs() - bound).argmax())
        return Refusal(
            f"{int(wrong.sum())} of {wrong.numel()} elements differ from W0 + delta by more than one rounding to "
            f"{after.dtype} (worst: off by {residual.flatten()[worst].item():.3g}, delta "
            f"{delta.flatten()[worst].item():.3g})",
            "report this as a bug",
        )
    if bool(delta.any()) and torch.equal(before, after):
        return Refusal(
            f"it did not change: the delta rounds away entirely in {after.dtype}", "serve in float32 or unmerged"
        )
    return None
