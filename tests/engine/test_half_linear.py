"""The half-precision linear kernel (csrc/half_linear.cpp via server.engine.half_linear) against a float64 product,
and models routed through it against the same models' plain forwards."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForCausalLM

from server.boot.boot import boot
from server.config.load import load_config
from server.engine import slab_ops
from server.engine.engine import Engine
from server.engine.half_linear import HalfLinear, half_kernel, route_half_linears
from server.engine.kernels import prepack_supported
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest

CPU = torch.device("cpu")
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of the output's one rounding
# Half the spacing of the dtype's subnormals: the absolute error of rounding a result that small.
SUBNORMAL = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 65]  # x-row groups of 4 and row blocks of 64, with their remainders
SHAPES = [(1, 37), (3, 100), (129, 2051), (49152, 67)]  # (out, in): tails of every width; the vocabulary's head


@pytest.fixture(scope="module")
def ops() -> Any:
    built = slab_ops.load_slab_ops("on", CPU)
    assert built is not None and hasattr(built, "half_linear"), "the library has no half_linear (no AVX2/FMA/F16C?)"
    return built


def _bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, bound): the float64 product and how far from it one float32 accumulation plus one rounding to w's
    dtype may land. x and w are exact in float32 and so are their products (bf16: 8 + 8 significant bits, fp16:
    11 + 11, both <= 24), so the only errors are the float32 sums, <= gamma_n * sum|x w| with n = in (+ 1 for the
    bias) terms in any order (Higham, Accuracy and Stability, 3.1), and the final rounding, <= u |result| plus half
    a subnormal step."""
    n = w.shape[1] + (b is not None)
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    xd, wd = x.double().reshape(-1, w.shape[1]), w.double()
    exact, size = xd @ wd.T, xd.abs() @ wd.abs().T
    if b is not None:
        exact, size = exact + b.double(), size + b.double().abs()
    accumulated = gamma * size
    return exact, accumulated + UNIT[w.dtype] * (exact.abs() + accumulated) + SUBNORMAL[w.dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("out", "inner"), SHAPES)
def test_half_linear_is_the_float64_product_within_one_float32_accumulation_and_one_rounding(
    ops: Any, dtype: torch.dtype, out: int, inner: int
) -> None:
    gen = torch.Generator().manual_seed(out * 7 + inner)
    weight = torch.randn(out, inner, generator=gen).to(dtype)
    bias = torch.randn(out, generator=gen).to(dtype)
    for rows in ROWS:
        wide = torch.randn(rows, 2 * inner, generator=gen).to(dtype)
        for x in (wide[:, :inner].contiguous(), wide[:, ::2]):  # contiguous, and a strided view
            for b in (bias, None):
                y = ops.half_linear(x, weight, b)
                assert y.shape == (rows, out) and y.dtype == dtype
                exact, bound = _bound(x, weight, b)
                excess = ((y.double() - exact).abs() - bound).max().item()
                assert excess <= 0, (rows, b is not None, x.is_contiguous(), excess)


def test_half_linear_keeps_leading_dimensions(ops: Any) -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 40, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 40, 2, generator=gen).to(torch.bfloat16).transpose(1, 2)  # (3, 2, 40), not contiguous
    y = ops.half_linear(x, weight, None)
    exact, bound = _bound(x, weight, None)
    assert y.shape == (3, 2, 24)
    assert ((y.reshape(6, 24).double() - exact).abs() <= bound).all()


def test_half_linear_layer_holds_the_same_weight_and_falls_back_where_the_kernel_does_not_apply(ops: Any) -> None:
    layer = nn.Linear(40, 24, dtype=torch.bfloat16)
    half = HalfLinear(layer, ops.half_linear)
    assert half.weight is layer.weight and half.bias is layer.bias
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(half(x), ops.half_linear(x, layer.weight, layer.bias))
    with torch.inference_mode(), pytest.raises(RuntimeError):  # a float32 x: F.linear refuses, as nn.Linear does
        half(x.float())
    got = half(x)  # outside inference mode, with a weight that wants gradients: F.linear, differentiable
    got.sum().backward()
    assert layer.weight.grad is not None


def test_the_kernel_is_chosen_for_half_precision_where_onednn_has_no_native_kernel(ops: Any) -> None:
    assert half_kernel(None, torch.bfloat16, CPU) is None  # fused_kernels: off
    assert half_kernel(ops, torch.float32, CPU) is None
    assert half_kernel(ops, torch.float16, CPU) is ops.half_linear  # oneDNN has no fp16 kernel on any CPU here
    native = prepack_supported(torch.bfloat16, CPU)  # avx512_bf16: packed for oneDNN instead
    assert half_kernel(ops, torch.bfloat16, CPU) is (None if native else ops.half_linear)


def _plain(model: nn.Module) -> nn.Module:
    """A copy of `model` with plain `nn.Linear` layers where it has `HalfLinear`s: the unmodified model."""
    plain = copy.deepcopy(model)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, HalfLinear):
                layer = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                layer.weight, layer.bias = child.weight, child.bias
                setattr(parent, name, layer)
    return plain


def _boot_bf16(write_config: Callable[[dict[str, Any]], Path], base: Path, adapter: Path) -> Engine:
    data = {
        "model": {"path": str(base), "id": "peaky", "dtype": "bfloat16"},
        "adapters": [{"name": "alpha", "path": str(adapter)}],
        "mode": "ab",
        "cache": {"enabled": False},
        "limits": {"max_input_tokens": 64, "max_total_tokens": 128, "max_new_tokens": 12},
    }
    return boot(load_config(write_config(data)))


def test_routing_keeps_every_weight_in_place_and_the_lora_side_path(ops: Any, peaky: tuple[Path, Path]) -> None:
    base = AutoModelForCausalLM.from_pretrained(peaky[0], dtype=torch.float16).eval()
    unmerged = PeftModel.from_pretrained(base, peaky[1]).eval()
    before = {name: p.data_ptr() for name, p in unmerged.named_parameters()}
    lora = [m for name, m in unmerged.named_modules() if ".lora_" in name and type(m) is nn.Linear]
    plain = sum(type(m) is nn.Linear for m in unmerged.modules()) - len(lora)
    assert route_half_linears({"unmerged": unmerged}, ops) == {"unmerged": plain}
    assert {name: p.data_ptr() for name, p in unmerged.named_parameters()} == before  # the same storage: no copy
    assert sum(isinstance(m, HalfLinear) for m in unmerged.modules()) == plain > 0
    kept = [m for name, m in unmerged.named_modules() if ".lora_" in name and type(m) is nn.Linear]
    assert len(kept) == len(lora) and all(a is b for a, b in zip(kept, lora, strict=True))  # LoRA's A/B untouched
    lora_layers = [m for m in unmerged.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and all(isinstance(m.get_base_layer(), HalfLinear) for m in lora_layers)
    assert unmerged.get_output_embeddings().weight is unmerged.get_input_embeddings().weight  # still tied


@pytest.mark.skipif(prepack_supported(torch.bfloat16, CPU), reason="native bf16 oneDNN here: bf16 is prepacked")
def test_a_bf16_engine_serves_the_greedy_tokens_of_the_plain_forward_through_the_kernel(
    ops: Any, write_config: Callable[[dict[str, Any]], Path], peaky: tuple[Path, Path]
) -> None:
    engine = _boot_bf16(write_config, *peaky)
    try:
        assert engine.info.engine["half_linear"] is True
        vocab = engine.arms["merged"].config.vocab_size
        prompts = [torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9)]
        for arm_name in ("merged", "unmerged"):
            arm = engine.arms[arm_name]
            assert sum(isinstance(m, HalfLinear) for m in arm.modules()) > 0
            plain = _plain(arm)
            for ids in prompts:
                request = PreparedRequest(input_ids=ids, params=SamplingParams(), max_new_tokens=12)
                got = [t.id for t in engine.generate(request, arm_name).tokens]
                with torch.inference_mode():
                    want = plain(input_ids=torch.tensor([ids + got])).logits[0, len(ids) - 1 :].float()  # (n+1, V)
                    routed = arm(input_ids=torch.tensor([ids + got])).logits[0, len(ids) - 1 :].float()
                # Each served token is the plain forward's greedy token: its argmax, or tied with it (bf16 logits
                # are coarse: two tokens of this model tie exactly at 4.25 after one prompt, whatever the kernels).
                chosen = want[torch.arange(len(got)), torch.tensor(got)]
                assert torch.equal(chosen, want[:-1].max(-1).values), arm_name
                # bf16 keeps 8 significant bits: another summation order moves a logit by a few 2^-8 of its size.
                assert (routed - want).abs().max().item() <= 0.02 * want.abs().max().item(), arm_name
    finally:
        engine.close()
