"""The torch engine's KV memory in bytes (server.engine.kv_budget): the slab's bytes against the formula worked out
here from the model's config.json, the slab held to its budget under a batch that wants more (requests wait, and
each still gets the tokens a plain greedy forward gives), and the prefix cache kept in a bf16 model's own dtype
without changing a bit of what it serves."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config.schema import LimitsConfig
from server.engine.attention import use_slab_attention
from server.engine.batch import Batch
from server.engine.kv_budget import GIB, lane_budget
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.types import Generation, PreparedRequest, Token
from server.errors import MergeserveError
from tests.engine.test_kv_slab import _drain_prefill, _prompt, _slab_model, _Tok


def _bytes_per_token(folder: Path, element_size: int) -> int:
    """layers x 2 (K and V) x KV heads x head dim x element size, from config.json itself."""
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * element_size


def _limits(batch: int, total: int) -> LimitsConfig:
    return LimitsConfig(max_input_tokens=total - 1, max_total_tokens=total, max_batch_size=batch)


def test_the_slab_holds_its_budget_in_bytes_and_never_doubles_past_max_total_tokens(tiny_base: Path) -> None:
    model = _slab_model(tiny_base)
    per_token = _bytes_per_token(tiny_base, 4)
    budget = lane_budget(model, _limits(batch=3, total=48), None, lanes=1, prefix_tokens=0)
    assert (budget.bytes_per_token, budget.tokens, budget.bytes) == (per_token, 3 * 48, 3 * 48 * per_token)
    vocab = model.config.vocab_size
    seqs = {name: _prompt(i, 30, vocab) for i, name in enumerate("abc")}
    batch: Batch[str] = Batch(slots=3, budget=64, kv=budget)
    for name in "abc":
        batch.add(name, list(seqs[name]), bound=48)
    _drain_prefill(model, batch, seqs)
    for _ in range(10):
        batch.step(model, torch.tensor([[seqs[row][-1]] for row in batch.rows]))
    slab = batch.slab
    # Unbudgeted, the slab starts at 256 columns: 3 x 256 positions, 5x what three 48-token requests can use.
    assert slab.capacity <= 48 and slab.rows == 3
    assert slab.nbytes == slab.rows * slab.capacity * per_token <= budget.bytes


def _solo_greedy(model: Any, ids: list[int], new: int) -> list[int]:
    out = list(ids)
    with torch.inference_mode():
        for _ in range(new):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def test_a_batch_that_wants_more_than_the_budget_waits_and_the_slab_stays_within_it(tiny_base: Path) -> None:
    """Four 40-token requests, a budget of two: at most two decode together, the slab never holds more than the
    budget, and every request gets the tokens a plain greedy forward of its own gives."""
    model = _slab_model(tiny_base)
    per_token = _bytes_per_token(tiny_base, 4)
    gib = 2 * 40 * per_token / GIB  # room for two requests of max_total_tokens
    budget = lane_budget(model, _limits(batch=4, total=40), gib, lanes=1, prefix_tokens=0)
    assert budget.tokens == 80 and budget.bytes == 80 * per_token
    seen: list[tuple[int, int]] = []  # (batch size, slab bytes) after each decode step
    scheduler = Scheduler({"m": model}, _Tok(), set(), max_batch_size=4, max_concurrent_requests=8, kv=budget)
    slab = scheduler.lanes["m"].batch.slab
    scheduler.on_step = lambda lane, size, queue: seen.append((size, slab.nbytes))
    prompts = [_prompt(10 + i, 25, model.config.vocab_size) for i in range(4)]
    results: list[list[int]] = [[] for _ in prompts]
    done = threading.Event()

    def emit_for(i: int) -> Any:
        def emit(item: Token | BaseException, gen: Generation) -> None:
            assert not isinstance(item, BaseException), item
            if gen.finish_reason is not None:
                results[i] = [t.id for t in gen.tokens]
                if all(results):
                    done.set()

        return emit

    try:
        for i, ids in enumerate(prompts):
            scheduler.submit(PreparedRequest(ids, SamplingParams(), max_new_tokens=15), emit_for(i))
        assert done.wait(timeout=120)
    finally:
        scheduler.close()
    assert max(size for size, _ in seen) == 2 and max(nbytes for _, nbytes in seen) <= budget.bytes
    assert results == [_solo_greedy(model, ids, 15) for ids in prompts]


def test_a_budget_below_one_request_is_refused_in_one_line(tiny_base: Path) -> None:
    model = _slab_model(tiny_base)
    per_token = _bytes_per_token(tiny_base, 4)
    with pytest.raises(MergeserveError) as caught:
        lane_budget(model, _limits(batch=4, total=64), 63 * per_token / GIB, lanes=1, prefix_tokens=0)
    line = caught.value.line()
    assert "\n" not in line and line.startswith("engine.kv_cache_gib: ") and "holds 63 tokens" in line
    assert "limits.max_total_tokens 64" in line and "fix:" in line


def _prefix_logits(model: Any, kv: Any) -> tuple[Batch[str], list[int], list[torch.Tensor]]:
    """a is prefilled and cached; b then starts after the 12 positions it shares with a -> (batch, a, b's logits)."""
    vocab = model.config.vocab_size
    system = _prompt(0, 12, vocab)  # the shared head, like a chat template's system prompt
    a, b = system + _prompt(1, 5, vocab), system + _prompt(2, 9, vocab)
    batch: Batch[str] = Batch(slots=2, budget=8, prefix_tokens=256, kv=kv)
    batch.add("a", a, bound=32)
    while batch.prefilling:
        for row, _ in batch.prefill(model, batch.next_chunks()):
            batch.join(row)
    batch.add("b", b, bound=32)
    assert batch.prefilling[0].done == 12
    out = []
    while batch.prefilling:
        for row, logits in batch.prefill(model, batch.next_chunks()):
            out.append(logits)
            batch.join(row)
    return batch, a, out


def test_a_bf16_models_prefix_cache_is_bf16_and_serves_the_same_bits(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    assert use_slab_attention(model)
    kv = lane_budget(model, _limits(batch=2, total=32), None, lanes=1, prefix_tokens=256)
    assert (kv.dtype, kv.prefix_dtype) == (torch.float32, torch.bfloat16)  # the slab attends in float32 on the CPU
    assert kv.prefix_bytes == 256 * _bytes_per_token(tiny_base, 2)
    batch, a, served = _prefix_logits(model, kv)
    for layer, (k, v) in enumerate(batch.prefixes.entries[tuple(a)]):
        assert k.dtype == v.dtype == torch.bfloat16
        # a sits in slot 0: its prompt's columns, computed in bf16, stored wider in the float32 slab
        assert torch.equal(k.float(), batch.slab.keys[layer][0, :, : len(a)])
        assert torch.equal(v.float(), batch.slab.values[layer][0, :, : len(a)])
    _, _, reference = _prefix_logits(model, None)  # no budget: the cache copies the slab's float32, as before
    assert len(served) == 1 and all(torch.equal(x, y) for x, y in zip(served, reference, strict=True))
