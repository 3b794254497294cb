"""The slab KV cache and chunked, batched prefill against a plain `model(input_ids)` forward of each whole sequence.

Rows join at different steps, their prompts go in chunks smaller than the prompts, several share a prefill forward,
and rows leave mid-batch (so the last row moves into the gap): every logit vector a row gets must still be the one a
cache-free forward over that row's own tokens gives.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.attention import use_slab_attention, wants_bool_mask
from server.engine.batch import Batch
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.types import Generation, PreparedRequest, Token

TOL = 1e-4  # float32 attention sums in another order: ~1e-6 here; a wrong position or key is off by > 1e-2


def _prompt(seed: int, length: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _reference(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1]


def _slab_model(path: Path) -> Any:
    """A checkpoint loaded as the engine serves it: eval mode, attention switched to the slab's."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert use_slab_attention(model)
    return model


def _check(model: Any, seqs: dict[str, list[int]], row: str, logits: torch.Tensor) -> None:
    expected = _reference(model, seqs[row])  # no mask: transformers' SDPA even after use_slab_attention
    diff = (logits[0] - expected).abs().max().item()
    assert diff <= TOL, f"row {row} at length {len(seqs[row])}: max |logit diff| {diff:.2e}"
    seqs[row].append(int(expected.argmax()))


def _drain_prefill(model: Any, batch: Batch[str], seqs: dict[str, list[int]]) -> None:
    while batch.prefilling:
        for row, logits in batch.prefill(model, batch.next_chunks()):
            _check(model, seqs, row, logits)
            batch.join(row)


@pytest.mark.parametrize("attention", ["slab", "sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_that_join_and_leave_see_only_their_own_tokens(
    arch: str, attention: str, tiny_base: Path, tiny_gpt2: Path
) -> None:
    """slab: the engine's attention (boolean mask, grouped-query heads shared); sdpa and eager: transformers' own,
    with the additive mask. The reference is a plain forward of the same model, no cache, no mask."""
    path = tiny_base if arch == "llama" else tiny_gpt2
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager" if attention == "eager" else "sdpa")
    model.eval()
    if attention == "slab":
        assert use_slab_attention(model) and wants_bool_mask(model)
    vocab = model.config.vocab_size
    seqs = {name: _prompt(i, length, vocab) for i, (name, length) in enumerate([("a", 3), ("b", 11), ("c", 7)])}
    batch: Batch[str] = Batch(slots=3, budget=8)  # b's 11 tokens go in two chunks; a and c share a forward
    for name in ("a", "b"):
        batch.add(name, list(seqs[name]))
    _drain_prefill(model, batch, seqs)
    checked = 0
    for step in range(12):
        if step == 2:
            batch.add("c", list(seqs["c"]))
            _drain_prefill(model, batch, seqs)
        tokens = torch.tensor([[seqs[row][-1]] for row in batch.rows])  # (B, 1)
        logits = batch.step(model, tokens)
        for i, row in enumerate(batch.rows):
            _check(model, seqs, row, logits[i : i + 1])
            checked += 1
        if step == 4:  # the first row leaves: the last one moves into its slot
            batch.filter([i for i, row in enumerate(batch.rows) if row != "a"])
            assert "a" not in batch.rows and len(batch.rows) == 2
    assert checked >= 12 * 2 and batch.slab.capacity >= max(len(s) for s in seqs.values())


def test_a_short_prompt_is_answered_before_a_long_prompt_finishes_prefill(tiny_base: Path) -> None:
    """Chunked prefill: a 4-token prompt that arrives while a 60-token one is in its first chunk gets its first token
    before the long one does (its prefill is one chunk; the long one's is eight)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    gate, first_forward = threading.Event(), threading.Event()
    real_forward = model.forward

    def gated(*args: Any, **kwargs: Any) -> Any:
        first_forward.set()
        assert gate.wait(timeout=30)
        return real_forward(*args, **kwargs)

    model.forward = gated  # type: ignore[method-assign]
    firsts: list[str] = []
    done = threading.Event()

    def emit_for(name: str) -> Any:
        def emit(item: Token | BaseException, gen: Generation) -> None:
            assert not isinstance(item, BaseException), item
            if len(gen.tokens) == 1:
                firsts.append(name)
            if len(firsts) == 2:
                done.set()

        return emit

    scheduler = Scheduler({"m": model}, _Tok(), {1}, max_batch_size=4, max_concurrent_requests=4, prefill_budget=8)
    try:
        vocab = model.config.vocab_size
        scheduler.submit(_req(_prompt(1, 60, vocab)), emit_for("long"))
        assert first_forward.wait(timeout=30)  # the long prompt's first chunk is in the model now
        scheduler.submit(_req(_prompt(2, 4, vocab)), emit_for("short"))
        gate.set()
        assert done.wait(timeout=60)
    finally:
        scheduler.close()
    assert firsts == ["short", "long"]


def _req(ids: list[int], new_tokens: int = 2) -> PreparedRequest:
    return PreparedRequest(input_ids=ids, params=SamplingParams(), max_new_tokens=new_tokens)


class _Tok:
    """What the scheduler asks of a tokenizer: special ids and decoding single tokens."""

    all_special_ids = (0, 1)

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(f"<{i}>" for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"<{i}>" for i in ids]


def test_a_sliding_window_model_is_refused_unless_requests_fit_the_window() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    from server.engine.kv_slab import refuse_sliding_window
    from server.load.adapters import BootError

    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=64)  # fmt: skip
    model = MistralForCausalLM(config)
    with pytest.raises(BootError) as refused:
        refuse_sliding_window(model, max_total_tokens=96)
    assert "limits.max_total_tokens" in refused.value.line() and "64" in refused.value.line()
    refuse_sliding_window(model, max_total_tokens=64)  # no request can outgrow the window: served as it is


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 4,
            "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_a_length_dependent_rope_is_refused_unless_requests_stay_where_it_is_fixed(rope: dict[str, Any]) -> None:
    """transformers changes these frequencies with the forward's largest position; a batched forward would give
    every request in it the longest one's: refused at boot, naming the key and the length that fits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.engine.kv_slab import refuse_length_dependent_rope
    from server.load.adapters import BootError

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         rope_parameters={"rope_theta": 10000.0, **rope})  # fmt: skip
    model = LlamaForCausalLM(config)
    with pytest.raises(BootError) as refused:
        refuse_length_dependent_rope(model, max_total_tokens=96)
    line = refused.value.line()
    assert "limits.max_total_tokens" in line and rope["rope_type"] in line and "to 64 or less" in line
    refuse_length_dependent_rope(model, max_total_tokens=64)  # every position stays where the frequencies are fixed
    plain = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "rope_parameters": {"rope_theta": 10000.0}}))
    refuse_length_dependent_rope(plain, max_total_tokens=4096)  # static frequencies: served at any length


@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize(
    ("dtype", "kv"), [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]
)
def test_slab_attention_matches_a_float64_softmax(dtype: torch.dtype, kv: torch.dtype, queries: int) -> None:
    """A bf16 model's slab may hold float32 K/V (the query is cast to match): the output must be softmax(q k^T /
    sqrt(D) + mask) v over each query head's own KV head, computed here in float64 with the heads repeated by hand,
    and come back in the query's dtype and transformers' (n, C, H, D) layout."""
    from server.engine.attention import slab_attention

    gen = torch.Generator().manual_seed(0)
    n, heads, kv_heads, width, dim = 2, 6, 2, 9, 16
    query = torch.randn(n, heads, queries, dim, generator=gen).to(dtype)
    key = torch.randn(n, kv_heads, width, dim, generator=gen).to(kv)
    value = torch.randn(n, kv_heads, width, dim, generator=gen).to(kv)
    columns = torch.tensor([[5 + q for q in range(queries)], [2 + q for q in range(queries)]])  # row lengths differ
    mask = (torch.arange(width)[None, None, :] <= columns[:, :, None])[:, None]  # (n, 1, C, width)
    out, _ = slab_attention(torch.nn.Module(), query, key, value, mask, scaling=dim**-0.5)
    assert out.dtype == dtype and out.shape == (n, queries, heads, dim)
    k64 = key.double().repeat_interleave(heads // kv_heads, dim=1)
    v64 = value.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = (query.double() @ k64.transpose(-1, -2)) * dim**-0.5  # (n, H, C, width)
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v64  # (n, H, C, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 mantissa bits: inputs and output round by 2^-8
    diff = (out.double() - expected.transpose(1, 2)).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.2e}"


def test_a_bf16_model_keeps_float32_kv_and_decodes_like_its_float32_forward(tiny_base: Path) -> None:
    """The slab of a bf16 model under the engine's attention stores K/V in float32; each decode step's logits must
    match a plain forward of the same bf16 weights in float32 to within what bf16 activations round (measured: 2.7e-3;
    a mask that lets each query see one column too far gives 3.0e-2)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).float().eval()
    assert use_slab_attention(model)
    ids = _prompt(5, 9, model.config.vocab_size)
    batch: Batch[str] = Batch(slots=2, budget=16)
    batch.add("a", list(ids))
    ((row, logits),) = batch.prefill(model, batch.next_chunks())
    batch.join(row)
    worst = 0.0
    for _ in range(6):
        ids.append(int(logits[0].argmax()))
        logits = batch.step(model, torch.tensor([[ids[-1]]]))
        expected = _reference(reference, ids)
        worst = max(worst, (logits[0].float() - expected).abs().max().item())
    assert batch.slab.keys[0].dtype == torch.float32 and logits.dtype == torch.bfloat16
    assert worst <= 1e-2, f"max |logit diff| {worst:.2e}"
