"""The decoder stack run layer by layer: the engine's forward for Llama-family models, without transformers' wrappers.

A served forward is the arithmetic of `model(...)`: embeddings, then per layer RMSNorm, q/k/v projections, rotary
embedding, attention over the slab, o projection, RMSNorm, gated MLP, each residual added; the final norm and the
vocabulary projection of the kept positions. transformers wraps that in per-call machinery a serving loop does not
use (output capturing, config-default merging, the attention-function registry, mask building, per-layer kwargs).
Here the same modules are called directly, in the same order on the same tensors, so the logits are bit-identical
(tests/engine/test_decoder.py) and PEFT's LoRA layers, prepacked linears and each norm's own arithmetic are unchanged.
On the 2-core development machine it ran a decode step 5-10 % faster (docs/benchmarks.md, "Profile of a decode step").

Only architectures whose layers are exactly that (`FAMILIES`) take this path, and only if no module whose forward it
skips has hooks or a forward replaced on the instance: accelerate's hooks (a model split over devices, or layers
offloaded to disk) move or load weights there. Anything else runs `model(...)` as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from transformers.cache_utils import Cache

from server.engine.attention import transformers_model

# model_type -> its decoder layer class: pre-norm attention with rotary embeddings from the model's `rotary_emb`,
# then a pre-norm gated MLP (Qwen2's biases live in its projections; sliding windows are refused by the slab).
FAMILIES = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}

# query (n, H, C, D), the cache's keys and values for it, scale -> attention output (n, C, H, D)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def direct_stack(model: nn.Module) -> Any | None:
    """The transformers causal LM inside `model` (PEFT unwrapped) if its forward can run layer by layer here, else
    None. Walks every layer: call it once per model, not per forward."""
    lm = transformers_model(model)
    layer_class = FAMILIES.get(getattr(getattr(lm, "config", None), "model_type", ""))
    base = getattr(lm, "model", None)
    layers = getattr(base, "layers", None)
    if layer_class is None or layers is None or not hasattr(lm, "lm_head"):
        return None
    if any(type(layer).__name__ != layer_class for layer in layers) or _family_rotary(layers[0]) is None:
        return None
    skipped = [model, getattr(model, "base_model", model), lm, base]  # modules whose forward is not called here
    skipped += [m for layer in layers for m in (layer, layer.self_attn, layer.mlp)]
    return None if any(map(_hooked, skipped)) else lm


def _hooked(module: nn.Module) -> bool:
    """A forward replaced on the instance (accelerate's hooks do that, and record `_hf_hook`) or torch hooks: work
    that skipping the module's forward would skip too."""
    patched = "forward" in vars(module) or "_hf_hook" in vars(module)
    return patched or bool(module._forward_hooks) or bool(module._forward_pre_hooks)


def _family_rotary(layer: nn.Module) -> Any:
    """The family's own `apply_rotary_pos_emb` (its modeling module's), so the rotation is transformers' arithmetic."""
    return getattr(sys.modules[type(layer).__module__], "apply_rotary_pos_emb", None)


def _attention(
    attn: Any, x: torch.Tensor, rotary: Any, cos: torch.Tensor, sin: torch.Tensor, cache: Cache, attend: Attend
) -> torch.Tensor:
    """x: (n, C, d) normed hidden states; cos/sin: (n, C, D) -> the attention block's output (n, C, d)."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    query = attn.q_proj(x).view(shape).transpose(1, 2)  # (n, H, C, D)
    key = attn.k_proj(x).view(shape).transpose(1, 2)  # (n, Hkv, C, D)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    query, key = rotary(query, key, cos, sin)
    keys, values = cache.update(key, value, attn.layer_idx)
    out = attend(query, keys, values, attn.scaling)  # (n, C, H, D)
    return cast(torch.Tensor, attn.o_proj(out.reshape(*x.shape[:-1], -1)))


def _mlp(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))


def run_stack(
    lm: Any, ids: torch.Tensor, positions: torch.Tensor, cache: Cache, attend: Attend, keep: int | torch.Tensor
) -> torch.Tensor:
    """ids, positions: (n, C) -> logits (n, K, V) at the kept positions: the last `keep` if an int, else those
    indices (transformers' `logits_to_keep`); `cache.update` writes each layer's K/V and returns what `attend` reads.
    """
    base = lm.model
    rotary = _family_rotary(base.layers[0])
    hidden = base.embed_tokens(ids)  # (n, C, d)
    cos, sin = base.rotary_emb(hidden, positions)  # (n, C, D) each, in the hidden states' dtype
    for layer in base.layers[: lm.config.num_hidden_layers]:
        normed = layer.input_layernorm(hidden)
        hidden = hidden + _attention(layer.self_attn, normed, rotary, cos, sin, cache, attend)
        hidden = hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden))
    kept = hidden[:, -keep:] if isinstance(keep, int) else hidden[:, keep]  # (n, K, d): the norm is per position
    return cast(torch.Tensor, lm.lm_head(base.norm(kept)))
