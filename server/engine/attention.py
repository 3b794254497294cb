"""Attention for the KV slab: SDPA that reads grouped-query K/V in place.

transformers' SDPA path copies K and V once per layer and step to repeat each KV head for its query heads
(`repeat_kv`) whenever a mask is given, and the slab always gives one. SmolLM2 has 9 query heads over 3 KV heads, so
that copy triples the bytes attention reads; torch's SDPA can share the heads itself (`enable_gqa`). The engine
registers this function under its own name and switches served models that use "sdpa" to it: with the slab's
boolean mask it calls SDPA with enable_gqa; anything else (no mask, a padding mask from a plain forward) goes to
transformers' own SDPA function unchanged, so plain forwards of the served model are transformers' SDPA.

A half-precision model on the CPU keeps its slab in float32 (see `kv_dtype`) and attends in float32: torch's CPU
flash kernel is 4-5x slower in bf16 than in float32 for one query over a few hundred keys (8 rows x 150 keys: 0.59
vs 0.13 ms a layer; 30 layers made it 17 % of a batch-8 step), and casting the slab's K/V to float32 on every step
costs as much as it saves (strided copies), so they are stored in float32 once. Only the query is cast, and the
output goes back to the model's dtype; float32 also accumulates the softmax where bf16 would round it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SLAB_ATTENTION = "mergeserve_sdpa"


def slab_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query: (n, H, C, D), key/value: (n, Hkv, S, D), mask: (n, 1, C, S) bool -> (n, C, H, D), as transformers'.

    A mixed forward (server.engine.mixed) passes its plan as `slab_plan`: the plan attends per group instead."""
    plan: Any = kwargs.get("slab_plan")
    if plan is not None:
        return plan.attend(query, key, value, scaling), None
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # type: ignore[arg-type]  # fmt: skip
    return slab_sdpa(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None


def slab_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """query: (n, H, C, D), key/value: (n, Hkv, S, D), mask: (n, 1, C, S) bool -> (n, H, C, D) in query's dtype.

    Grouped-query heads are shared in place (enable_gqa); the slab may hold float32 K/V for a half-precision model
    (`kv_dtype`), so the query is cast to the keys' dtype and the output back."""
    out = F.scaled_dot_product_attention(query.to(key.dtype), key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])  # fmt: skip
    return out.to(query.dtype)


def transformers_model(model: nn.Module) -> Any:
    get_base_model = getattr(model, "get_base_model", None)  # PEFT wraps the transformers model
    return get_base_model() if callable(get_base_model) else model


def use_slab_attention(model: nn.Module) -> bool:
    """Switch a served transformers model from "sdpa" to `slab_attention` (registered once per process; registering
    again replaces the entry with the same function). Models on eager or other kernels are left as they are."""
    inner = transformers_model(model)
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", SLAB_ATTENTION):
        return False
    AttentionInterface.register(SLAB_ATTENTION, slab_attention)
    AttentionMaskInterface.register(SLAB_ATTENTION, sdpa_mask)
    inner.set_attn_implementation(SLAB_ATTENTION)
    return True


def wants_bool_mask(model: nn.Module) -> bool:
    inner = transformers_model(model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == SLAB_ATTENTION


def slab_kv_dtype(weights: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype `slab_attention` keeps K/V in for a model whose weights are `weights` on `device_type`: float32
    for bf16/fp16 on the CPU (see the module docstring: 2x the K/V memory of half precision, for attention 4-5x
    faster; the fused decode kernels read float32 too), else the weights' own."""
    if device_type == "cpu" and weights in (torch.bfloat16, torch.float16):
        return torch.float32
    return weights


def kv_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the slab stores K/V in: `slab_kv_dtype` for a model served through `slab_attention` (which casts
    the query to match) when it differs from the weights', else None: the model's own K/V dtype."""
    if not wants_bool_mask(model):
        return None  # transformers' kernels want K/V in the query's dtype
    weight = next(model.parameters())
    stored = slab_kv_dtype(weight.dtype, weight.device.type)
    return None if stored == weight.dtype else stored
