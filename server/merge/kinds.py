"""One adapter's exact change to one layer, for every LoRA kind we merge: the task vector the merge adds to W0.

Every kind reduces to a float32 delta shaped like the stored base weight (and, with `lora_bias`, a bias delta):

- plain LoRA, rsLoRA, rank_pattern / alpha_pattern: s * B @ A. PEFT already resolved the per-module r and alpha into
  `layer.scaling` (alpha/r, or alpha/sqrt(r) for rsLoRA), and boot multiplied in the configured weight w.
- fan_in_fan_out (GPT-2's Conv1D stores W as (in, out)) and embeddings (A is (r, vocab), B is (dim, r), the table is
  (vocab, dim)): the same product, transposed into the stored layout.
- DoRA: W' = f * (W + sBA) with f = m / ||W0 + sBA||, the norm taken per output feature over the input axis on the
  *unmerged* W0 (as PEFT's forward does; it detaches the norm, which only matters for training).
- lora_bias: B carries a bias b_B; the base bias moves by s * b_B.

Several adapters on one layer compose the way PEFT's unmerged forward runs them, in the configured order: a plain
adapter adds its product; a DoRA adapter rescales everything accumulated so far (the forward scales the running
output, base bias excluded) and adds its own. Without DoRA that is the plain sum. `adapter_delta` is one adapter's
change on its own (its task vector, for TIES/DARE); `composed_delta` is the exact change of all of them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from server.errors import Refusal
from server.merge.scratch import Scratch


@dataclass
class LayerDelta:
    """Float32 change to a layer's stored weight (same shape) and, if any, to its bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def _weight(module: object) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)  # type: ignore[attr-defined]


def is_embedding(layer: LoraLayer) -> bool:
    return isinstance(layer.get_base_layer(), nn.Embedding)


def out_axis(layer: LoraLayer) -> int:
    """The axis of the stored weight that indexes output features: 0 for nn.Linear, 1 for Conv1D and embeddings."""
    return 1 if is_embedding(layer) or getattr(layer, "fan_in_fan_out", False) else 0


def has_adapter(layer: LoraLayer, adapter: str) -> bool:
    return adapter in layer.lora_A or adapter in layer.lora_embedding_A


def uses_dora(layer: LoraLayer, adapter: str) -> bool:
    return adapter in getattr(layer, "lora_magnitude_vector", {})


def uses_bias(layer: LoraLayer, adapter: str) -> bool:
    return bool(getattr(layer, "lora_bias", {}).get(adapter, False))


def lora_product(layer: LoraLayer, adapter: str, scratch: Scratch | None = None) -> torch.Tensor:
    """s * B @ A for one adapter, in float32, in the layout of the stored base weight (in `scratch`'s "delta" buffer
    when given: valid until the next layer's product)."""
    s = layer.scaling[adapter]
    if adapter in layer.lora_embedding_A:
        a = cast(torch.Tensor, layer.lora_embedding_A[adapter]).float()  # (r, vocab)
        b = cast(torch.Tensor, layer.lora_embedding_B[adapter]).float()  # (dim, r)
        return (b @ a).T * s  # (vocab, dim)
    a = _weight(layer.lora_A[adapter]).detach().float()  # (r, in)
    b = _weight(layer.lora_B[adapter]).detach().float()  # (out, r)
    out = None if scratch is None else scratch.take("delta", torch.Size((b.shape[0], a.shape[1])), b.dtype, b.device)
    delta = torch.mm(b, a, out=out).mul_(s)  # (out, in); in place: one pass less over a weight-sized tensor
    return delta.T if out_axis(layer) == 1 else delta


def _apply(
    layer: LoraLayer,
    adapter: str,
    w0: torch.Tensor,
    delta: torch.Tensor | None,
    bias: torch.Tensor | None,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One adapter's step on the running float32 change to the weight (and bias; None: no change yet), given the
    unmerged base weight w0 (any dtype; only DoRA reads it, in float32).

    Kept as a change, never as W0 + change: a delta far below W0's float32 resolution must survive to the
    "did the weight change" check instead of vanishing in W0 + delta - W0. The first adapter's product is the change
    itself (0 + x is x), so a single adapter costs one weight-sized float32 tensor, not three: on the 7.4B model
    the delta took 45 s of a 127 s merge before.
    """
    product = lora_product(layer, adapter, scratch if delta is None else None).to(w0.device)
    if uses_bias(layer, adapter):
        own = cast(torch.Tensor, layer.lora_B[adapter].bias).float().to(w0.device) * layer.scaling[adapter]
        bias = own if bias is None else bias + own
    if not uses_dora(layer, adapter):
        return (product if delta is None else delta.add_(product)), bias
    w0f = w0.float()
    delta = torch.zeros_like(w0f) if delta is None else delta
    axis = out_axis(layer)
    # Norm per output feature, over the input axis: ||W0 + sBA||_c in the DoRA paper, computed in float32.
    norm = torch.linalg.vector_norm(w0f + product, dim=1 - axis)
    factor = _weight(layer.lora_magnitude_vector[adapter]).float().to(w0f.device) / norm
    shaped = factor.view(-1, 1) if axis == 0 else factor.view(1, -1)
    # f * (W0 + delta + sBA) - W0
    return (shaped - 1) * w0f + shaped * (delta + product), None if bias is None else factor * bias


def adapter_delta(layer: LoraLayer, adapter: str, w0: torch.Tensor) -> LayerDelta:
    """What merging `adapter` alone adds to this layer, given the unmerged base weight `w0`."""
    weight, bias = _apply(layer, adapter, w0, None, None)
    return LayerDelta(weight, bias)


def composed_delta(
    layer: LoraLayer, adapters: list[str], w0: torch.Tensor, scratch: Scratch | None = None
) -> LayerDelta:
    """The exact change of `adapters` together, in order, as PEFT's unmerged forward composes them (the first
    adapter's product in `scratch` when given)."""
    delta: torch.Tensor | None = None
    bias = None
    for adapter in adapters:
        if has_adapter(layer, adapter):
            delta, bias = _apply(layer, adapter, w0, delta, bias, scratch)
    return LayerDelta(torch.zeros_like(w0, dtype=torch.float32) if delta is None else delta, bias)


def layer_kind_problem(layer: LoraLayer, adapter: str) -> Refusal | None:
    """Why this adapter's delta on this layer cannot be computed exactly here, or None if it can."""
    base = layer.get_base_layer()
    if not isinstance(base, (nn.Linear, nn.Embedding)) and type(base).__name__ != "Conv1D":
        return Refusal(f"cannot merge into {type(base).__name__}", "serve unmerged")
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not uses_dora(layer, adapter):
        return Refusal(f"LoRA variant {type(variant).__name__} is not supported", "serve it with PEFT")
    if uses_bias(layer, adapter) and getattr(base, "bias", None) is None:
        return Refusal("lora_bias on a layer without a bias cannot be merged", "retrain with lora_bias=False")
    return None
