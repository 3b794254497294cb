"""Prompt-prefix reuse (server.engine.prefix_cache): a newcomer whose prompt shares a prefix with an earlier prompt
starts its prefill after that prefix, and every logit it gets still equals a plain `model(input_ids)` forward of its
own tokens (tests/engine/test_kv_slab.py's reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.batch import Batch
from server.engine.kv_slab import KVSlab
from server.engine.prefix_cache import PrefixCache
from tests.engine.test_kv_slab import _check, _drain_prefill, _prompt, _slab_model


def _decode(model: torch.nn.Module, batch: Batch[str], seqs: dict[str, list[int]], steps: int) -> None:
    for _ in range(steps):
        tokens = torch.tensor([[seqs[row][-1]] for row in batch.rows])  # (B, 1)
        logits = batch.step(model, tokens)
        for i, row in enumerate(batch.rows):
            _check(model, seqs, row, logits[i : i + 1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_shared_prefix_is_reused_and_every_logit_matches_a_plain_forward(
    arch: str, tiny_base: Path, tiny_gpt2: Path
) -> None:
    model = _slab_model(tiny_base if arch == "llama" else tiny_gpt2)
    vocab = model.config.vocab_size
    system = _prompt(0, 12, vocab)  # the shared head, like a chat template's system prompt
    seqs = {"a": system + _prompt(1, 5, vocab), "b": system + _prompt(2, 9, vocab)}
    batch: Batch[str] = Batch(slots=3, budget=8, prefix_tokens=256)
    batch.add("a", list(seqs["a"]))
    assert batch.prefilling[0].done == 0  # nothing cached yet
    _drain_prefill(model, batch, seqs)
    _decode(model, batch, seqs, 3)
    batch.add("b", list(seqs["b"]))
    assert batch.prefilling[0].done == 12  # b's prefill starts after the shared head
    _drain_prefill(model, batch, seqs)
    _decode(model, batch, seqs, 3)
    # The lane goes idle (the slab is freed); a prompt equal to a's computes only its last token from the cache.
    batch.clear()
    seqs["c"] = list(seqs["a"][:17])
    batch.add("c", list(seqs["c"]))
    assert batch.prefilling[0].done == 16
    _drain_prefill(model, batch, seqs)
    _decode(model, batch, seqs, 3)
    assert batch.prefixes.reused == 12 + 16


def test_the_cache_keeps_at_most_its_token_budget_least_recently_used_out_first() -> None:
    slab = KVSlab(2)
    slab.reserve(8)
    slab.layer(0, torch.zeros(1, 1, 8, 2))
    slab.keys[0][0, 0, :8] = torch.arange(8.0)[:, None]  # column j holds j: copies are checked by value
    cache = PrefixCache(max_tokens=10)
    cache.store(slab, 0, [1, 2, 3, 4])
    cache.store(slab, 0, [1, 2, 9, 9, 9])
    cache.store(slab, 0, list(range(20, 31)))  # 11 tokens: more than the whole budget, not kept
    assert cache.tokens == 9 and len(cache.entries) == 2
    assert cache.fill(slab, 1, [1, 2, 3, 7, 7]) == 3
    assert slab.keys[0][1, 0, :3, 0].tolist() == [0.0, 1.0, 2.0]
    cache.store(slab, 0, [5, 6, 7])  # 12 tokens: [1, 2, 9, 9, 9] was used least recently and leaves
    assert list(cache.entries) == [(1, 2, 3, 4), (5, 6, 7)] and cache.tokens == 7
    assert cache.fill(slab, 1, [1, 2, 9, 9]) == 2  # only the head shared with (1, 2, 3, 4) is left
    assert PrefixCache(max_tokens=0).fill(slab, 1, [1, 2, 3]) == 0
