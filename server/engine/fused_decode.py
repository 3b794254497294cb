"""A decode step through the fused CPU kernels (server.engine.slab_ops): the direct stack's arithmetic in 4 calls a
layer besides its linear layers.

Each decoder layer of the direct stack (server.engine.decoder) runs ~150 small ATen calls around its 7 linear
layers: norms as 8 ops each, rotary embedding as ~12, the slab write as index_put with its index tensors, SDPA with
its mask and casts. On the 2-core development machine their dispatch, not their arithmetic, was most of the
20-45 % of a decode step that is not the linear layers (docs/benchmarks.md, "Profile of a decode step"). Here each
layer is: RMSNorm with the residual add, the q/k/v projections, rotary embedding with the K/V write into the slab,
attention of each row over its own slot's columns, o projection, RMSNorm with the residual add, gate and up, SiLU
times up, down projection. The linear layers are the model's own modules (prepacked, or PEFT's LoRA layers with
the adapter on the side), so the A/B arms differ exactly as before.

Numerics: the same operations in the same dtypes, rounded where transformers' modules round, with the sums inside
RMSNorm and attention in another order; float32 logits match a cache-free forward to ~1e-5 (tests/engine/
test_fused_decode.py). Used only for decode steps of the running batch (one token per row, slots 0..n-1), on the
CPU, with a float32 slab, for models whose norms, rotary embedding and MLP are the Llama family's (`fusable`).
"""

from __future__ import annotations

from typing import Any

import torch

from server.engine.kernels import small_rows_scope
from server.engine.kv_slab import KVSlab

_SILU = {"SiLU", "SiLUActivation"}  # torch's, and transformers' `ACT2FN["silu"]`


def fusable(lm: Any) -> bool:
    """Whether the layers of `lm`, a model `decoder.direct_stack` accepted (so of a family in `decoder.FAMILIES`:
    attention without q/k norms), are what the kernels compute: RMSNorm with a weight (and no offset), SiLU-gated
    MLP. Checked because configs can swap the activation (`hidden_act`)."""
    norms = [lm.model.norm] + [n for layer in lm.model.layers for n in (layer.input_layernorm,
                                                                         layer.post_attention_layernorm)]  # fmt: skip
    if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
        return False
    return all(type(layer.mlp.act_fn).__name__ in _SILU for layer in lm.model.layers)


@torch.inference_mode()
def decode_step(ops: Any, lm: Any, slab: KVSlab, tokens: torch.Tensor) -> torch.Tensor | None:
    """tokens: (n, 1), the next token of the rows in slots 0..n-1 -> logits (n, V), or None where the kernels do not
    apply (the slab not yet allocated for every layer, or not float32 on the CPU): the caller runs the eager step."""
    n = tokens.shape[0]
    columns = slab.lengths[:n]
    slab.reserve(max(columns) + 1)
    allocated = len(slab.keys) >= lm.config.num_hidden_layers
    if not allocated or tokens.device.type != "cpu" or slab.keys[0].dtype != torch.float32:
        return None
    with small_rows_scope(lm, n):
        return fused_decode(ops, lm, tokens, slab.keys, slab.values, columns)[:, 0]


def fused_decode(ops: Any, lm: Any, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 columns: list[int]) -> torch.Tensor:  # fmt: skip
    """tokens: (n, 1), row i's next token for column columns[i] of slot i; keys/values: the slab's layers (slots,
    Hkv, capacity, D), float32, allocated -> logits (n, 1, V). Writes each layer's new K/V into the slab."""
    base = lm.model
    n = tokens.shape[0]
    hidden = base.embed_tokens(tokens).reshape(n, -1).contiguous()  # (n, d)
    cols = torch.tensor(columns, dtype=torch.long, device=tokens.device)  # (n,)
    slots = torch.arange(n, device=tokens.device)
    cos, sin = base.rotary_emb(hidden[:, None], cols[:, None])  # (n, 1, D) each, in the hidden states' dtype
    heads = lm.config.num_attention_heads
    delta: torch.Tensor | None = None  # what the next norm adds to the residual stream first
    for i, layer in enumerate(base.layers[: lm.config.num_hidden_layers]):
        norm = layer.input_layernorm
        hidden, normed = ops.add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)
        attn = layer.self_attn
        query = ops.rope_store(attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed), cos, sin, keys[i],
                               values[i], slots, cols, heads)  # fmt: skip  # (n, H, D) float32
        out = ops.slab_attend(query, keys[i], values[i], slots, cols, attn.scaling, hidden.dtype)  # (n, H x D)
        norm = layer.post_attention_layernorm
        hidden, normed = ops.add_rms_norm(hidden, attn.o_proj(out), norm.weight, norm.variance_epsilon)
        mlp = layer.mlp
        delta = mlp.down_proj(ops.silu_mul(mlp.gate_proj(normed), mlp.up_proj(normed)))
    _, normed = ops.add_rms_norm(hidden, delta, base.norm.weight, base.norm.variance_epsilon)
    return lm.lm_head(normed)[:, None]
