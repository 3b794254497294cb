"""LoRA merge math, in one place.

A LoRA layer computes  y = W0 x + sum_i s_i * B_i (A_i x)  where s_i = alpha_i / r_i (or alpha_i / sqrt(r_i) for
rsLoRA), already multiplied by the adapter's configured weight w_i when the adapters were loaded. Merging writes
W = W0 + sum_i s_i * B_i A_i  into the base weight, so the model answers the same without the side path.

Numerics: the deltas are small against W0 (often < 0.1 % of |W0|), so the sum is formed in float32 and rounded to the
serving dtype once. Rounding each delta, or adding them one by one in bf16/fp16, loses most of their low bits.
PEFT's `add_weighted_adapter(..., "linear")` is not used: it mixes A and B separately, which adds cross terms B_i A_j.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, onload_layer
from torch import nn


class MergeError(Exception):
    """A merge that cannot be done exactly; the message names the adapter, the module and the fix."""


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def check_mergeable(model: nn.Module, adapters: list[str]) -> None:
    """Refuse, before anything is touched, the layer variants whose delta is not  s * B @ A."""
    for name, layer in lora_layers(model):
        for adapter in adapters:
            if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
                continue
            if layer.use_dora.get(adapter, False):
                raise MergeError(f"adapter '{adapter}', module '{name}': DoRA is not supported yet | serve unmerged")
            if getattr(layer, "lora_bias", {}).get(adapter, False):
                raise MergeError(f"adapter '{adapter}', module '{name}': lora_bias is not supported yet | retrain")
            base = layer.get_base_layer()
            if not isinstance(base, (nn.Linear, nn.Embedding)) and type(base).__name__ != "Conv1D":
                raise MergeError(
                    f"adapter '{adapter}', module '{name}': cannot merge into {type(base).__name__} | serve unmerged"
                )


def _weight(module: object) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)  # type: ignore[attr-defined]


def base_weight(layer: LoraLayer) -> torch.Tensor:
    return _weight(layer.get_base_layer())


def delta_weight(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """s * B @ A for one adapter, in float32, shaped like the base weight."""
    if adapter in layer.lora_embedding_A:
        # Embedding LoRA stores A as (r, vocab) and B as (dim, r); the table is (vocab, dim), hence the transpose.
        a = cast(torch.Tensor, layer.lora_embedding_A[adapter]).float()
        b = cast(torch.Tensor, layer.lora_embedding_B[adapter]).float()
        return (b @ a).T * layer.scaling[adapter]
    a = _weight(layer.lora_A[adapter]).float()  # (r, in)
    b = _weight(layer.lora_B[adapter]).float()  # (out, r)
    delta = b @ a  # (out, in)
    if getattr(layer, "fan_in_fan_out", False):
        # GPT-2's Conv1D stores W as (in, out).
        delta = delta.T
    return delta * layer.scaling[adapter]


def merged_weight(w0: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """W0 + sum of deltas, accumulated in float32 and rounded once to W0's dtype."""
    acc = w0.float().clone()
    for d in deltas:
        acc += d.to(acc.device)
    return acc.to(w0.dtype)


def _adapters_in(layer: LoraLayer, adapters: list[str]) -> list[str]:
    return [a for a in adapters if a in layer.lora_A or a in layer.lora_embedding_A]


def merge_layer(layer: LoraLayer, adapters: list[str]) -> bool:
    """Write the merged weight into the base layer, on the device where that weight lives.

    Returns whether the stored weight changed: a non-zero delta that rounds away entirely is silent damage.
    """
    names = _adapters_in(layer, adapters)
    weight = base_weight(layer)
    deltas = [delta_weight(layer, a).to(weight.device) for a in names]
    new = merged_weight(weight.data, deltas)
    changed = not torch.equal(new, weight.data)
    weight.data.copy_(new)
    return changed or all(not d.any() for d in deltas)


def _drop_lora_modules(model: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper by its base layer."""
    for name, layer in list(lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cast(nn.Module, layer.get_base_layer()))
    return model


def merge_and_unload(peft_model: nn.Module, adapters: list[str]) -> nn.Module:
    """Merge the weighted adapters into the base weights and return the bare base model.

    Raises MergeError if a targeted weight did not change or a LoRA module or meta tensor remains.
    """
    check_mergeable(peft_model, adapters)
    unchanged = []
    for name, layer in lora_layers(peft_model):
        # onload_layer brings offloaded (device_map) weights in, and writes them back out after the merge.
        with onload_layer(layer):
            if not merge_layer(layer, adapters):
                unchanged.append(name)
    if unchanged:
        raise MergeError(
            f"{len(unchanged)} targeted weights did not change (first: '{unchanged[0]}'): the delta rounds away in "
            "the serving dtype | serve in float32 or unmerged"
        )
    base = cast(nn.Module, peft_model.get_base_model()) if isinstance(peft_model, PeftModel) else peft_model
    model = _drop_lora_modules(base)
    if hasattr(model, "peft_config"):
        del model.peft_config
    check_clean(model)
    return model


def check_clean(model: nn.Module) -> None:
    """No LoRA module and no meta tensor may remain after a merge."""
    leftovers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) or ".lora_" in n]
    if leftovers:
        raise MergeError(f"LoRA modules remain after merging (first: '{leftovers[0]}') | report this as a bug")
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise MergeError(f"meta tensors remain after merging (first: '{meta[0]}') | give the model more device memory")


def merged_twin(peft_model: nn.Module, adapters: list[str]) -> nn.Module:
    """A merged model that shares every tensor with `peft_model` except the adapted weights.

    For A/B serving in one process: embeddings, norms and untargeted layers exist once; each adapted layer gets its
    own merged weight (the only extra memory), and the twin has no LoRA modules.
    """
    check_mergeable(peft_model, adapters)
    base = cast(nn.Module, peft_model.get_base_model()) if isinstance(peft_model, PeftModel) else peft_model
    # deepcopy makes new module objects; the memo hands back the very same tensors instead of copies.
    shared: dict[int, object] = {id(t): t for t in (*base.parameters(), *base.buffers())}
    twin = copy.deepcopy(base, memo=shared)
    for _, layer in lora_layers(twin):
        target = layer.get_base_layer()
        names = _adapters_in(layer, adapters)
        merged = merged_weight(_weight(target).data, [delta_weight(layer, a) for a in names])
        target.weight = nn.Parameter(merged, requires_grad=False)
    twin = _drop_lora_modules(twin)
    if hasattr(twin, "peft_config"):
        del twin.peft_config
    check_clean(twin)
    return twin


@contextmanager
def temporarily_merged(peft_model: nn.Module, adapters: list[str]) -> Iterator[nn.Module]:
    """Run the model as if merged, then restore the adapted weights bit for bit.

    Used to check parity while serving unmerged: only the adapted weights are copied, and restoring from the copy
    (not subtracting the delta) keeps W0 exact in every dtype.
    """
    check_mergeable(peft_model, adapters)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    layers = [layer for _, layer in lora_layers(peft_model)]
    try:
        for layer in layers:
            weight = base_weight(layer)
            saved.append((weight, weight.data.clone()))
            merge_layer(layer, adapters)
        with peft_model.disable_adapter():  # type: ignore[operator]
            yield peft_model
    finally:
        for weight, original in saved:
            weight.data.copy_(original)
