"""The element-wise merge check, run in chunks with the spacing read off the bits, against its definition."""

from __future__ import annotations

import math

import pytest
import torch

from server.merge import check
from server.merge.check import half_spacing, write_problem

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def frexp_half_spacing(stored: torch.Tensor) -> torch.Tensor:
    """The definition: for |x| in [2^(e-1), 2^e) (frexp's e) the gap is eps * 2^(e-1); below the smallest normal it
    is the fixed subnormal step smallest_normal * eps. Half of it, in float32."""
    info = torch.finfo(stored.dtype)
    x = stored.float().abs()
    _, exponent = torch.frexp(x)
    gap = torch.ldexp(torch.full_like(x, info.eps), exponent - 1)
    gap = torch.where(x < info.smallest_normal, torch.full_like(x, info.smallest_normal * info.eps), gap)
    return gap / 2


def whole_tensor_excess(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The check's definition on whole float32 temporaries: by how much each element's residual exceeds one
    rounding (positive: wrong)."""
    w0, w = before.float(), after.float()
    residual = (w - w0) - delta
    return residual.abs() - (frexp_half_spacing(after) + 2.0**-23 * (w.abs() + w0.abs() + delta.abs()))


def _edges(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    subnormal = info.smallest_normal * info.eps
    normal = info.smallest_normal
    values = [0.0, -0.0, subnormal, -subnormal, 3 * subnormal, normal / 2, normal, -normal, 1.0, -1.0, 2.0, 0.5,
              2.0**-20, 1024.0, -(2.0**13), info.max, -info.max]  # fmt: skip
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_spacing_agrees_with_its_definition(dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        generator = torch.Generator().manual_seed(0)
        bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), dtype=torch.int32, generator=generator)
        values = torch.cat([bits.view(torch.float32), _edges(dtype)])
    else:  # every 16-bit pattern
        values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    assert torch.equal(half_spacing(values), frexp_half_spacing(values))
    assert torch.equal(half_spacing(_edges(dtype)), frexp_half_spacing(_edges(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_spacing_of_inf_and_nan_is_finite(dtype: torch.dtype) -> None:
    """So an element that overflowed to inf, or became NaN, is off by more than its bound."""
    spacing = half_spacing(torch.tensor([math.inf, -math.inf, math.nan]).to(dtype))
    assert bool(torch.isfinite(spacing).all())


def _merge(dtype: torch.dtype, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    w0 = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    w0.view(-1)[:64] = _edges(dtype).repeat(4)[:64].to(dtype).clamp(-1, 1)  # zeros, subnormals, powers of two
    delta = torch.randn(shape, generator=generator) * 1e-3
    return w0, (w0.float() + delta).to(dtype), delta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [7, 1000, 1 << 18])
def test_write_problem_agrees_with_the_whole_tensor_check(
    dtype: torch.dtype, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check, "CHUNK", chunk)
    w0, honest, delta = _merge(dtype, (37, 211))
    assert not bool((whole_tensor_excess(w0, honest, delta) > 0).any()) and write_problem(w0, honest, delta) is None
    broken = honest.clone()
    flat = broken.view(-1)
    # Forgotten writes at both ends and at chunk boundaries, and one element written twice.
    for at in {0, chunk - 1, chunk, 2 * chunk + 1, flat.numel() - 1} & set(range(flat.numel())):
        flat[at] = w0.view(-1)[at]
    flat[100] = (w0.view(-1)[100].float() + 2 * delta.view(-1)[100]).to(dtype)
    excess = whole_tensor_excess(w0, broken, delta)
    problem = write_problem(w0, broken, delta)
    assert problem is not None and problem.problem.startswith(f"{int((excess > 0).sum())} of {excess.numel()} elements")
    # The worst element is named with its residual, as the whole-tensor check would find it.
    worst = int(excess.argmax())
    residual = (broken.float() - w0.float()) - delta
    assert f"off by {residual.view(-1)[worst].item():.3g}" in problem.problem


def test_write_problem_refuses_nan_and_overflow() -> None:
    w0, honest, delta = _merge(torch.float16, (8, 64))
    for bad in (math.nan, math.inf):
        broken = honest.clone()
        broken.view(-1)[5] = bad
        problem = write_problem(w0, broken, delta)
        assert problem is not None and problem.problem.startswith("1 of 512 elements")


def test_write_problem_still_refuses_a_delta_that_rounds_away() -> None:
    w0 = torch.full((4, 300), 1.0, dtype=torch.bfloat16)
    delta = torch.full((4, 300), 1e-6)
    problem = write_problem(w0, w0.clone(), delta)
    assert problem is not None and "rounds away entirely" in problem.problem
