"""Prompt-prefix reuse for one lane (vLLM's automatic prefix caching, TGI's prefix cache): the K/V of recent prompts,
copied into a newcomer's slot for the longest prefix they share, so its prefill starts after it.

Chat requests share long prefixes: the chat template's system prompt and turn markers are the same for every
request, ~30 of the demo prompts' ~44 tokens. Prefill is compute-bound (a 51-token forward ~37 ms of linear layers
on the 2-core machine, near its bf16 peak), so tokens not recomputed are time saved, and copying 30 cached columns
per layer is far cheaper than computing them.

Exactness: a causal model's K/V at position j depend only on tokens 0..j, so a shared prefix has the same K/V in any
prompt, up to float rounding in the kernels (a prefix computed in a 51-token forward vs a 44-token one may differ in
the last bit, like any two batch compositions). The prompt's last token is always computed, since its logits pick
the first generated token. Entries belong to one lane: the arms of an A/B process are different models.

Memory: at most `max_tokens` cached positions (least recently used prompts leave first), each K and V for every layer
in `dtype`, the weights' dtype when the engine builds it (server.engine.kv_budget): the demo in float32 keeps 46 KB
a token, 94 MB at the default 2048; a bf16 model half what its float32 slab holds, and exactly its values (a
prompt's K/V are computed in bf16 and only stored wider in the slab). The entries outlive the running batch (an idle
lane keeps them), which is what lets the next request reuse them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from server.engine.kv_slab import KVSlab

DEFAULT_PREFIX_CACHE_TOKENS = 2048  # engine.prefix_cache_tokens when the config leaves it null
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each (Hkv, T, D)


def _shared(a: tuple[int, ...], b: list[int]) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Recent prompts' K/V, least recently used first; `max_tokens` 0 disables it; `dtype`: what the entries are
    kept in (None: the slab's)."""

    def __init__(self, max_tokens: int, dtype: torch.dtype | None = None) -> None:
        self.max_tokens, self.dtype = max_tokens, dtype
        self.entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self.tokens = 0
        self.reused = 0  # prompt tokens served from the cache so far (for tests and logs)

    @torch.inference_mode()  # the slab's tensors are inference tensors
    def fill(self, slab: KVSlab, slot: int, ids: list[int]) -> int:
        """Copy the longest cached prefix of `ids` (all but its last token at most) into `slot`; -> its length."""
        best, length = None, 0
        for key in self.entries:
            shared = _shared(key, ids)
            if shared > length:
                best, length = key, shared
        length = min(length, len(ids) - 1)
        if best is None or length <= 0:
            return 0
        self.entries.move_to_end(best)
        slab.reserve(length)
        for index, (k, v) in enumerate(self.entries[best]):
            keys, values = slab.layer(index, k[None])  # allocates the slab's layers if this lane is fresh
            keys[slot, :, :length] = k[:, :length]
            values[slot, :, :length] = v[:, :length]
        self.reused += length
        return length

    @torch.inference_mode()
    def store(self, slab: KVSlab, slot: int, ids: list[int]) -> None:
        """Keep the K/V of the prompt `ids`, whose columns 0..len(ids)-1 in `slot` are now all computed."""
        key = tuple(ids)
        if not 0 < len(key) <= self.max_tokens or key in self.entries:
            return
        self.entries[key] = [
            (k[slot, :, : len(key)].to(self.dtype or k.dtype, copy=True),
             v[slot, :, : len(key)].to(self.dtype or v.dtype, copy=True))
            for k, v in zip(slab.keys, slab.values, strict=True)
        ]  # fmt: skip
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)
