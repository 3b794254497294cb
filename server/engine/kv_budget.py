"""The torch engine's serving memory in bytes: what one cached token costs, and how many a lane's KV slab may hold.

A cached token costs, in every layer, one key and one value vector per KV head:

    bytes per token = layers x 2 x kv_heads x head_dim x bytes of the slab's dtype

SmolLM2-135M in float32: 30 x 2 x 3 x 64 x 4 = 46,080 B. The 8B shape in bf16 on the CPU: 32 x 2 x 8 x 128 x 4 =
256 KiB, because the slab of a half-precision model on the CPU is float32 (`attention.slab_kv_dtype`: attention
and the fused decode kernels read float32 K/V, 4-5x faster than bf16 there).

The slab's budget is a number of token positions per lane (arm):
- `engine.kv_cache_gib` set: that many GiB for all arms together (vLLM's meaning), split evenly, capped at the most
  the slab can use (below).
- null: limits.max_batch_size x limits.max_total_tokens, every slot at its longest request: the most the slab can
  use, so a default config never waits on it (what it held before budgets existed, without the doubling past
  max_total_tokens).

The slab is slots x columns (server.engine.kv_slab), so a batch fits when the slots in use times the longest request
among them (prompt + max_new_tokens) fits the budget; a newcomer that would break it waits in the queue, as TGI's
max_batch_total_tokens makes it wait. A budget below one request of limits.max_total_tokens could never serve a
request validation accepts: refused at boot, as TGI's launcher refuses max_total_tokens above its batch total.

The prefix cache (server.engine.prefix_cache) is apart from it: engine.prefix_cache_tokens positions per lane, kept in
the weights' dtype. A prompt's K/V are computed in that dtype, so the float32 slab holds them exactly and the
cached copy loses nothing (tests/engine/test_kv_budget.py checks it bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from server.config.schema import LimitsConfig
from server.engine.attention import slab_kv_dtype, transformers_model, wants_bool_mask
from server.load.adapters import BootError

GIB = 1 << 30


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVShape:
    """What a model caches per token and layer: `kv_heads` keys and values of `head_dim`, in each of `layers`."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVShape:
        """From a transformers config (GPT-2's n_layer/n_head map onto these names through its attribute_map); a
        config without KV heads of its own counts one per attention head, the most it can cache."""
        try:
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return cls(config.num_hidden_layers, kv_heads, head_dim)
        except AttributeError as exc:
            raise ValueError(f"the model's config does not say what its KV cache holds per token: {exc}") from None

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype.itemsize

    def formula(self, dtype: torch.dtype) -> str:
        return (f"{self.layers} layers x 2 x {self.kv_heads} KV heads x {self.head_dim} head dim x "
                f"{dtype.itemsize} B ({dtype_name(dtype)})")  # fmt: skip


@dataclass(frozen=True)
class KVBudget:
    """One lane's KV slab budget (`tokens` positions in `dtype`) and its prefix cache; every lane gets the same."""

    shape: KVShape
    dtype: torch.dtype
    tokens: int
    derived_from: str
    prefix_dtype: torch.dtype
    prefix_tokens: int
    lanes: int = 1

    @property
    def bytes_per_token(self) -> int:
        return self.shape.bytes_per_token(self.dtype)

    @property
    def bytes(self) -> int:
        """The slab's budget for one lane."""
        return self.tokens * self.bytes_per_token

    @property
    def prefix_bytes(self) -> int:
        """The prefix cache's most for one lane."""
        return self.prefix_tokens * self.shape.bytes_per_token(self.prefix_dtype)

    @property
    def total_bytes(self) -> int:
        """Slabs and prefix caches of every lane: the engine's serving memory beside the weights."""
        return self.lanes * (self.bytes + self.prefix_bytes)

    def as_dict(self) -> dict[str, Any]:
        """/info's `engine.kv_cache` and `engine.prefix_cache`."""
        return {
            "kv_cache": {
                "bytes": self.lanes * self.bytes,
                "bytes_per_arm": self.bytes,
                "tokens_per_arm": self.tokens,
                "bytes_per_token": self.bytes_per_token,
                "dtype": dtype_name(self.dtype),
                "formula": self.shape.formula(self.dtype),
                "derived_from": self.derived_from,
            },
            "prefix_cache": {
                "bytes": self.lanes * self.prefix_bytes,
                "bytes_per_arm": self.prefix_bytes,
                "tokens_per_arm": self.prefix_tokens,
                "bytes_per_token": self.shape.bytes_per_token(self.prefix_dtype),
                "dtype": dtype_name(self.prefix_dtype),
            },
        }


def kv_budget(shape: KVShape, weights: torch.dtype, device_type: str, limits: LimitsConfig,
              kv_cache_gib: float | None, lanes: int, prefix_tokens: int) -> KVBudget:  # fmt: skip
    """The budget of each of `lanes` lanes serving a model of `shape` with `weights` on `device_type`; BootError when
    `kv_cache_gib` cannot hold one request of limits.max_total_tokens per lane."""
    dtype = slab_kv_dtype(weights, device_type)
    per_token = shape.bytes_per_token(dtype)
    most = limits.max_batch_size * limits.max_total_tokens
    derived = f"limits.max_batch_size {limits.max_batch_size} x limits.max_total_tokens {limits.max_total_tokens}"
    tokens = most
    if kv_cache_gib is not None:
        tokens = int(kv_cache_gib * GIB) // lanes // per_token
        if tokens < limits.max_total_tokens:
            need = lanes * limits.max_total_tokens * per_token / GIB
            raise BootError(
                f"engine.kv_cache_gib {kv_cache_gib:g} holds {tokens} tokens per arm ({lanes} arm(s), {per_token} B a "
                f"token: {shape.formula(dtype)}), fewer than one request of limits.max_total_tokens "
                f"{limits.max_total_tokens}",
                f"set engine.kv_cache_gib to at least {need:.3g}, or lower limits.max_total_tokens",
                "engine.kv_cache_gib",
            )
        derived = f"engine.kv_cache_gib {kv_cache_gib:g} over {lanes} arm(s)"
        if tokens > most:
            derived += f", capped at {most} tokens: every slot at limits.max_total_tokens"
            tokens = most
    return KVBudget(shape, dtype, tokens, derived, weights, prefix_tokens, lanes)


def lane_budget(
    model: nn.Module, limits: LimitsConfig, kv_cache_gib: float | None, lanes: int, prefix_tokens: int
) -> KVBudget:
    """`kv_budget` for a loaded model served through the slab (its attention already switched, see
    `attention.use_slab_attention`); a model on transformers' own attention keeps K/V in its weights' dtype."""
    weight = next(model.parameters())
    device = weight.device.type if wants_bool_mask(model) else "any"
    shape = KVShape.of(transformers_model(model).config)
    return kv_budget(shape, weight.dtype, device, limits, kv_cache_gib, lanes, prefix_tokens)
