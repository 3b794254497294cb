"""The fused decode kernels (server/engine/csrc/slab_ops.cpp via server.engine.fused_decode) against independent
references: each kernel against the transformers module or torch op it replaces, and whole decode steps against a
cache-free `model(input_ids)` of the whole sequence, per family the direct stack serves, in float32 and bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from server.engine import slab_ops
from server.engine.batch import decode_rows
from server.engine.decoder import direct_stack
from server.engine.fused_decode import decode_step, fusable
from server.engine.kv_slab import KVSlab, forward
from server.load.adapters import BootError
from tests.engine.test_decoder import FAMILIES, SIZES, _model, _served

TOL = 1e-4  # float32 against a cache-free forward: sums in another order, ~1e-6 here


@pytest.fixture(scope="module")
def ops() -> Any:
    built = slab_ops.load_slab_ops("on", torch.device("cpu"))
    assert built is not None
    return built


def test_add_rms_norm_is_transformers_rmsnorm_of_the_residual_sum(ops: Any) -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
        torch.nn.init.normal_(norm.weight, mean=1, std=0.3)
        hidden, delta = torch.randn(5, 64, dtype=dtype) * 3, torch.randn(5, 64, dtype=dtype)
        expected_sum = hidden + delta  # in the model's dtype, as the decoder adds its residual
        summed, normed = ops.add_rms_norm(hidden.clone(), delta, norm.weight, 1e-5)
        assert torch.equal(summed, expected_sum)
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding step of outputs ~1
        torch.testing.assert_close(normed, norm(expected_sum), rtol=tol, atol=tol)
        untouched = hidden.clone()
        same, normed = ops.add_rms_norm(untouched, None, norm.weight, 1e-5)
        assert torch.equal(same, hidden)
        torch.testing.assert_close(normed, norm(hidden), rtol=tol, atol=tol)


def test_rope_store_rotates_as_transformers_and_writes_each_token_at_its_slot_and_column(ops: Any) -> None:
    torch.manual_seed(1)
    heads, kv_heads, dim, tokens = 4, 2, 16, 3
    q, k, v = (torch.randn(tokens, h * dim) for h in (heads, kv_heads, kv_heads))
    angles = torch.rand(tokens, 1, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (N, 1, D), as rotary_emb's
    keys, values = torch.zeros(4, kv_heads, 10, dim), torch.zeros(4, kv_heads, 10, dim)
    slots, columns = torch.tensor([2, 0, 3]), torch.tensor([7, 0, 4])
    rotated = ops.rope_store(q, k, v, cos, sin, keys, values, slots, columns, heads)
    q_ref, k_ref = apply_rotary_pos_emb(q.view(tokens, 1, heads, dim).transpose(1, 2),
                                        k.view(tokens, 1, kv_heads, dim).transpose(1, 2), cos, sin)  # fmt: skip
    torch.testing.assert_close(rotated, q_ref[:, :, 0], rtol=1e-6, atol=1e-6)
    for i, (slot, column) in enumerate(zip(slots.tolist(), columns.tolist(), strict=True)):
        torch.testing.assert_close(keys[slot, :, column], k_ref[i, :, 0], rtol=1e-6, atol=1e-6)
        assert torch.equal(values[slot, :, column], v[i].view(kv_heads, dim))
    written = (keys.abs().sum(-1) > 0).sum().item()
    assert written == tokens * kv_heads  # nothing else in the slab was touched


def test_slab_attend_is_causal_sdpa_over_each_tokens_own_row(ops: Any) -> None:
    torch.manual_seed(2)
    heads, kv_heads, dim, width = 6, 2, 16, 40
    keys, values = torch.randn(3, kv_heads, width, dim), torch.randn(3, kv_heads, width, dim)
    slots, columns = torch.tensor([1, 0, 2, 1]), torch.tensor([39, 0, 17, 5])
    query = torch.randn(4, heads, dim)
    out = ops.slab_attend(query, keys, values, slots, columns, 0.25, torch.float32)  # (N, H x D)
    for i, (slot, column) in enumerate(zip(slots.tolist(), columns.tolist(), strict=True)):
        k, v = keys[slot, :, : column + 1], values[slot, :, : column + 1]
        ref = F.scaled_dot_product_attention(query[i][:, None], k.repeat_interleave(3, 0), v.repeat_interleave(3, 0),
                                             scale=0.25)  # fmt: skip  # (H, 1, D)
        torch.testing.assert_close(out[i].view(heads, dim), ref[:, 0], rtol=1e-5, atol=1e-5)


def test_silu_mul_is_the_gated_mlp_product(ops: Any) -> None:
    gate, up = torch.randn(3, 50) * 4, torch.randn(3, 50)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def _decode_through_rows(model: Any, prompts: list[list[int]], steps: int, ops: Any) -> list[list[int]]:
    """Prefill each prompt into its slot, then greedy decode steps of all rows through the fused kernels; checks
    every step's logits against a cache-free forward of each row's whole sequence."""
    slab, stack = KVSlab(len(prompts)), direct_stack(model)
    assert stack is not None and fusable(stack)
    seqs = [list(p) for p in prompts]
    last = []
    for slot, prompt in enumerate(prompts):
        logits = forward(model, slab, torch.tensor([slot]), torch.tensor([prompt]), [0], [len(prompt) - 1], stack)
        slab.lengths[slot] = len(prompt)
        last.append(logits[0])
    dtype = next(model.parameters()).dtype
    tol = TOL if dtype == torch.float32 else 0.15  # bf16 logits of ~5: a few rounding steps of the residual stream
    for _ in range(steps):
        tokens = torch.tensor([[int(row.argmax())] for row in last])
        for seq, token in zip(seqs, tokens[:, 0].tolist(), strict=True):
            seq.append(token)
        logits = decode_step(ops, stack, slab, tokens)  # (B, V)
        assert logits is not None  # the kernels ran, not the eager fallback
        slab.lengths = [n + 1 for n in slab.lengths]
        for row, seq in enumerate(seqs):
            with torch.inference_mode():
                reference = model(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits[row].float(), reference.float(), rtol=tol, atol=tol)
        last = list(logits)
    return seqs


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_decode_steps_match_a_cache_free_forward(name: str, ops: Any) -> None:
    model = _served(name)
    _decode_through_rows(model, [[5, 17, 3, 44, 9, 1, 60], [8, 2], [30, 31, 32, 33]], steps=6, ops=ops)


def test_fused_decode_in_bf16_matches_a_cache_free_bf16_forward(ops: Any) -> None:
    model = _served("llama").to(torch.bfloat16)
    _decode_through_rows(model, [[5, 17, 3, 44, 9, 1, 60], [8, 2]], steps=4, ops=ops)


def test_fused_decode_writes_the_slab_as_the_eager_step_does(ops: Any) -> None:
    """After the same steps, the fused and eager slabs hold the same K/V: a later eager forward (a prefill chunk,
    a mixed step) reads what the fused steps wrote."""
    model = _served("llama")
    stack = direct_stack(model)
    prompt = torch.tensor([[5, 17, 3, 44], [8, 2, 9, 1]])
    slabs = []
    for fused in (ops, None):
        slab = KVSlab(2)
        forward(model, slab, torch.arange(2), prompt, [0, 0], [3, 3], stack)
        slab.lengths = [4, 4]
        with torch.inference_mode():
            decode_rows(model, slab, torch.tensor([[7], [11]]), stack, fused)
        slabs.append(slab)
    for fused_keys, eager_keys in zip(slabs[0].keys + slabs[0].values, slabs[1].keys + slabs[1].values, strict=True):
        torch.testing.assert_close(fused_keys[:, :, :5], eager_keys[:, :, :5], rtol=1e-5, atol=1e-5)


def test_models_the_kernels_do_not_compute_are_not_fused() -> None:
    silly = _model(LlamaConfig(**SIZES, hidden_act="gelu"))
    stack = direct_stack(silly)
    assert stack is not None and not fusable(stack)


def test_settings_off_and_off_the_cpu() -> None:
    assert slab_ops.load_slab_ops("off", torch.device("cpu")) is None
    assert slab_ops.load_slab_ops("auto", torch.device("meta")) is None
    with pytest.raises(BootError, match=r"engine\.fused_kernels"):
        slab_ops.load_slab_ops("on", torch.device("meta"))


def _load_in_fresh_process(setting: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """load_slab_ops in a fresh process (this one has the kernels loaded) whose compiler does not exist."""
    code = f"""
import torch
from server.engine.slab_ops import load_slab_ops
from server.load.adapters import BootError
try:
    print("eager" if load_slab_ops("{setting}", torch.device("cpu")) is None else "fused")
except BootError as exc:
    print("refused", exc)
"""
    env = {k: v for k, v in os.environ.items() if k != "MERGESERVE_KERNEL_DIR"}  # nothing built ahead of time
    env.update(MERGESERVE_KERNEL_CACHE=str(cache), CXX=str(cache / "no-such-compiler"))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("setting", "outcome"), [("auto", "eager"), ("on", "refused")])
def test_a_machine_without_a_compiler(setting: str, outcome: str, tmp_path: Path) -> None:
    """No compiler and nothing built ahead of time: auto decodes eagerly, on refuses and says what to install.
    (Where kernels are loaded from, and when: tests/engine/test_kernel_load.py.)"""
    done = _load_in_fresh_process(setting, tmp_path)
    assert done.stdout.split()[0] == outcome, done.stdout + done.stderr
    if outcome == "refused":
        assert "install g++" in done.stdout
    else:
        assert "fused decode kernels unavailable" in done.stderr
