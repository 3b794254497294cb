"""scripts/bench_decode.py: its fixed-context decode step against a plain forward, and the break-even arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_decode

TOKEN = 42  # the token bench_decode's decode step feeds


@torch.inference_mode()
def test_repeated_decode_steps_see_the_same_context_as_a_full_forward() -> None:
    """Every timed step writes slot S of a StaticCache prefilled with S tokens, so each step's logits equal those of
    transformers' uncached forward over the S tokens plus the decoded one, however many steps ran before."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (2, 7))
    step = bench_decode.decode_step(model, bench_decode.prefilled_cache(model, ids), 2, 7, True)
    full = torch.cat([ids, torch.full((2, 1), TOKEN)], dim=1)
    expected = model(input_ids=full, use_cache=False).logits[:, -1]
    for _ in range(3):
        torch.testing.assert_close(step()[:, -1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("boot_s", "eager_ms", "compiled_ms", "batch", "tokens"),
    [
        (60.0, 100.0, 40.0, 1, 1000.0),
        (60.0, 100.0, 40.0, 8, 8000.0),
        (1.0, 50.0, 50.0, 1, None),
        (1.0, 50.0, 60.0, 1, None),
    ],
)
def test_break_even_tokens(
    boot_s: float, eager_ms: float, compiled_ms: float, batch: int, tokens: float | None
) -> None:
    """60 s of boot saved at 60 ms a step takes 1000 steps, each of `batch` tokens; a step no faster never pays."""
    assert bench_decode.break_even_tokens(boot_s, eager_ms, compiled_ms, batch) == tokens
