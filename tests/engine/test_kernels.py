"""Prepacked linear layers (server.engine.kernels) against the unpacked model they were packed from."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

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
    """`dtype: auto` times what the engine will run: the packed oneDNN linear at every row count where boot packs,
    plain F.linear when packing is off; and each gives the plain product."""
    weight = torch.randn(64, 32).to(dtype)
    packed, plain = linear_probe("auto").build(weight), linear_probe("off").build(weight)
    rows = {n: torch.randn(n, 32).to(dtype) for n in (1, 8)}
    assert all("mkldnn::_linear_pointwise" in _ops(packed, x) for x in rows.values())
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
def test_few_row_steps_stay_packed_and_agree(tiny_base: Path) -> None:
    """A one-row forward inside small_rows_scope (oneDNN off for plain matmuls) still runs the packed layers, whose
    plain weights are gone, and gives the 8-row path's logits within bf16 rounding."""
    from server.engine.kernels import small_rows_scope

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    prepack_linears(model)
    ids = torch.randint(2, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        packed = model(input_ids=ids).logits.float()
        with small_rows_scope(model, 1):
            assert not torch._C._get_mkldnn_enabled()
            few = model(input_ids=ids).logits.float()
    assert (few - packed).abs().max().item() <= 0.02 * packed.abs().max().item()


def test_packing_gives_the_plain_weights_back_and_keeps_what_is_shared(tmp_path: Path) -> None:
    """One copy: each packed layer's plain weight is emptied (its memory given back: a file mapping's pages are
    unmapped), a weight another module reads (a tied embedding) is kept, and the state dict unpacks what is served
    bit for bit. Memory, measured as resident pages of a memory-mapped model: packing adds the packed copies and
    gives the plain ones back, so RSS grows by far less than the linear layers' bytes (both kept: +100 %)."""
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # safetensors: the load maps it
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    linear_bytes = sum(m.weight.nbytes for m in model.modules() if type(m) is torch.nn.Linear)
    for p in model.parameters():
        p.detach().sum()  # every page resident, as after a merge
    before = _rss()
    assert prepack_linears(model) == 4 * 7 + 1
    grown = _rss() - before
    assert grown < 0.25 * linear_bytes, f"packing grew RSS by {grown / linear_bytes:.0%} of the linear layers"
    state = model.state_dict()
    assert state.keys() == plain.keys() and all(torch.equal(state[k], plain[k]) for k in plain)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PackedLinear) and "weight" not in layer._parameters
    # The tied head is packed, and the embedding it shares a tensor with keeps that tensor.
    assert model.model.embed_tokens.weight.numel() == config.vocab_size * config.hidden_size
    assert torch.equal(model.model.embed_tokens.weight, plain["model.embed_tokens.weight"])


def _rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
