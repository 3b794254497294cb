"""Prepacked linear layers (server.engine.kernels) against the unpacked model they were packed from."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from server.config.engine import EngineConfig
from server.engine.kernels import PackedLinear, linear_probe, prepack_linears, should_prepack

needs_bf16_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU has no native bf16 oneDNN kernels (the CI machine has: avx512_bf16)",
)


@needs_bf16_onednn
def test_packed_model_gives_the_unpacked_logits(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    peft_model = PeftModel.from_pretrained(base, tiny_adapters["alpha"]).eval()  # LoRA A/B and base layers
    packed = copy.deepcopy(peft_model)
    assert should_prepack({"unmerged": packed}, "auto")
    lora = sum(type(m) is torch.nn.Linear for name, m in packed.named_modules() if ".lora_" in name)
    n_linear = sum(type(m) is torch.nn.Linear for m in packed.modules())
    assert lora > 0 and prepack_linears(packed) == n_linear - lora > 0  # every linear but LoRA's A and B
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == n_linear - lora
    ids = torch.randint(2, base.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = peft_model(input_ids=ids).logits.float()  # (3, 9, V)
        got = packed(input_ids=ids).logits.float()
    # bf16 keeps 8 significant bits: another summation order moves a logit by a few units of 2^-8 of its size.
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.02 * scale
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


def test_float32_is_packed_and_stays_float32(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    """float32 packs too (oneDNN's packed f32 head ran 3.7x faster than F.linear's sgemm at 8 rows here) and computes in
    IEEE float32: no bf16/TF32 downconversion, which would move logits by ~1e-3 of their size, not ~1e-6."""
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, tiny_adapters["alpha"]).eval()
    packed = copy.deepcopy(peft_model)
    assert should_prepack({"unmerged": packed}, "auto") and prepack_linears(packed) > 0
    ids = torch.randint(2, base.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = peft_model(input_ids=ids).logits.double()  # (3, 9, V)
        raw = packed(input_ids=ids).logits
    assert raw.dtype == torch.float32
    got = raw.double()
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_off_means_off_and_float16_is_left_alone(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    assert not should_prepack({"merged": model}, "off")
    assert not should_prepack({"merged": model.to(torch.bfloat16)}, "off")
    assert not should_prepack({"merged": model.to(torch.float16)}, "auto")


def _ops(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> set[str]:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run(x)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_onednn)])
def test_dtype_probe_times_the_kernels_a_served_forward_runs(dtype: torch.dtype) -> None:
    """`dtype: auto` times what the engine will run: the packed oneDNN linear where boot packs, ATen's gemv for a
    one-row bf16 step, plain F.linear when packing is off; and each gives the plain product."""
    weight = torch.randn(64, 32).to(dtype)
    packed, plain = linear_probe("auto").build(weight), linear_probe("off").build(weight)
    rows = {n: torch.randn(n, 32).to(dtype) for n in (1, 8)}
    assert "mkldnn::_linear_pointwise" in _ops(packed, rows[8])
    assert ("mkldnn::_linear_pointwise" in _ops(packed, rows[1])) == (dtype == torch.float32)
    assert all("mkldnn::_linear_pointwise" not in _ops(plain, x) for x in rows.values())
    for x in rows.values():
        want = x.double() @ weight.double().T  # (rows, 64)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for run in (packed, plain):
            assert (run(x).double() - want).abs().max().item() <= tol * want.abs().max().item()
    assert linear_probe("off").name.endswith("(prepack_linear: off)")


def test_prepack_is_a_torch_setting() -> None:
    assert EngineConfig(prepack_linear="off").prepack_linear == "off"
    with pytest.raises(ValueError, match=r"engine\.prepack_linear is a torch-engine setting"):
        EngineConfig(kind="vllm", prepack_linear="on")


@needs_bf16_onednn
def test_few_row_steps_take_the_gemv_path_and_agree(tiny_base: Path) -> None:
    """A one-row forward inside small_rows_scope runs the unpacked weight through ATen (oneDNN off) and gives the
    packed path's logits within bf16 rounding; an 8-row forward keeps oneDNN on."""
    from server.engine.kernels import small_rows_scope

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    prepack_linears(model)
    ids = torch.randint(2, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        packed = model(input_ids=ids).logits.float()
        with small_rows_scope(model, 1):
            assert not torch._C._get_mkldnn_enabled()
            gemv = model(input_ids=ids).logits.float()
        with small_rows_scope(model, 8):
            assert torch._C._get_mkldnn_enabled()
    assert (gemv - packed).abs().max().item() <= 0.02 * packed.abs().max().item()
