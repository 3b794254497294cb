"""Prepacked linear layers (server.engine.kernels) against the unpacked model they were packed from."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.config.engine import EngineConfig
from server.engine.kernels import PackedLinear, prepack_linears, should_prepack

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


def test_float32_is_not_packed_unless_asked_and_off_means_off(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    assert not should_prepack({"merged": model}, "auto")
    assert not should_prepack({"merged": model.to(torch.bfloat16)}, "off")


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
