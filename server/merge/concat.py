"""Several weighted LoRA adapters as ONE LoRA, exactly: what an engine that serves one adapter per request applies.

At a module where adapters i = 1..n are present, with A_i (r_i, in), B_i (out, r_i) and s_i the per-module scaling
(alpha/r or alpha/sqrt(r), rank_pattern/alpha_pattern resolved by PEFT, the configured weight w_i multiplied in by
the loader), the block product

    [s_1 B_1 | ... | s_n B_n] @ [A_1; ...; A_n] = sum_i s_i B_i A_i

is the same delta the unmerged forward adds (PEFT names this combination `cat`). No cross terms B_i A_j appear, so
unlike mixing the A's and B's separately it is exact. The scaling is folded into B, so the written adapter has
lora_alpha = r (scaling exactly 1.0) and no rsLoRA flag, and no engine-side scaling rule can differ from PEFT's.

One rank R for every module (vLLM allocates one rank per adapter): each module's concatenation is padded with zero
rows of A and zero columns of B up to R = the largest sum of present ranks over the modules, which is sum_i r_i when
one module carries every adapter. Zero blocks add exactly zero. Modules the written config targets by name but no
adapter adapted (`layers_to_transform`) get all-zero factors, so PEFT finds every tensor it expects.

Numerics: each factor is read and scaled in float32 and rounded once to the output dtype; s_i B_i is one float32
multiply per entry, the products themselves are never formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from server.errors import Refusal
from server.merge.apply import lora_layers
from server.merge.kinds import has_adapter, uses_bias, uses_dora

# PEFT's saved keys: `base_model.model.<module>.lora_A.weight`, without the adapter name.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class CatLora:
    """The one-adapter form: PEFT-format tensors of rank `rank` at every module, scaling 1.0."""

    rank: int
    tensors: dict[str, torch.Tensor]  # PEFT saved key -> A (rank, in) or B (out, rank), in the asked dtype
    modules: list[str]  # module names without the PEFT prefix, in model order
    target_modules: list[str]  # the modules' leaf names, sorted: what the written config targets


def cat_problem(layer: LoraLayer, adapter: str) -> Refusal | None:
    """Why this adapter on this layer has no exact one-LoRA form here, or None."""
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        return Refusal(f"LoRA on {type(base).__name__} has no one-LoRA form here (nn.Linear only)", "use mode: merged")
    if uses_dora(layer, adapter):
        return Refusal("DoRA rescales W0 + sBA per output feature, which no LoRA expresses", "use mode: merged")
    if uses_bias(layer, adapter):
        return Refusal("lora_bias moves the base bias, which no LoRA expresses", "use mode: merged")
    if getattr(layer, "lora_variant", {}).get(adapter) is not None:
        return Refusal("a LoRA variant's forward is not s * B @ A", "use mode: merged")
    return None


def cat_factors(layer: LoraLayer, adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (A_cat (r_m, in), s-scaled B_cat (out, r_m)) of the present adapters, r_m the sum of their ranks."""
    a_parts, b_parts = [], []
    for adapter in adapters:
        if not has_adapter(layer, adapter):
            continue
        a = cast(torch.Tensor, layer.lora_A[adapter].weight).detach().float().cpu()  # (r_i, in)
        b = cast(torch.Tensor, layer.lora_B[adapter].weight).detach().float().cpu()  # (out, r_i)
        a_parts.append(a)
        b_parts.append(b * float(layer.scaling[adapter]))  # s_i already holds w_i
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)  # (r_m, in), (out, r_m)


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A (r_m, in) -> (rank, in), zero columns of B (out, r_m) -> (out, rank): same product."""
    missing = rank - a.shape[0]
    return (
        torch.cat([a, a.new_zeros(missing, a.shape[1])], dim=0),
        torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1),
    )


def _unadapted(model: nn.Module, leaves: set[str], adapted: set[str]) -> list[tuple[str, nn.Linear]]:
    """nn.Linear modules a leaf-name target list would match that no adapter adapted (LoRA internals skipped)."""
    inside = tuple(f"{name}." for name in adapted)
    found = []
    for name, module in model.named_modules():
        targeted = name.rpartition(".")[2] in leaves and name not in adapted and not name.startswith(inside)
        if targeted and isinstance(module, nn.Linear) and not isinstance(module, LoraLayer):
            found.append((name, module))
    return found


def _keys(module: str) -> tuple[str, str]:
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def cat_lora(model: nn.Module, adapters: list[str], dtype: torch.dtype) -> CatLora:
    """The exact one-LoRA form of `adapters` on a PEFT model (weights already in `layer.scaling`); base never read.

    Raises ValueError naming the module when `cat_problem` refuses one (callers check kinds before loading).
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in lora_layers(model):
        present = [a for a in adapters if has_adapter(layer, a)]
        for adapter in present:
            if problem := cat_problem(layer, adapter):
                raise ValueError(f"adapter '{adapter}', module '{name}': {problem.problem}")
        if present:
            factors[name] = cat_factors(layer, present)
    if not factors:
        raise ValueError("no adapter adapts any module")
    rank = max(a.shape[0] for a, _ in factors.values())
    leaves = {name.rpartition(".")[2] for name in factors}
    for name, linear in _unadapted(model, leaves, set(factors)):
        factors[name] = (torch.zeros(0, linear.in_features), torch.zeros(linear.out_features, 0))
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for name, (a, b) in factors.items():
        module = name.removeprefix(PEFT_PREFIX)
        a_key, b_key = _keys(PEFT_PREFIX + module)
        a_pad, b_pad = _pad(a, b, rank)
        tensors[a_key], tensors[b_key] = a_pad.to(dtype).contiguous(), b_pad.to(dtype).contiguous()
        modules.append(module)
    return CatLora(rank=rank, tensors=tensors, modules=modules, target_modules=sorted(leaves))
