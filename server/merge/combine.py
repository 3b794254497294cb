"""How the per-adapter deltas of one layer combine into the one delta that is merged.

`linear` (the default) is the exact weighted sum  sum_i w_i * delta_i: what the unmerged model computes, so it is the
only method the unmerged arm and the parity gate can reproduce. The others are opt-in task-vector merges that change
the function on purpose, applied to each layer's float32 deltas tau_i = w_i * delta_i:

- ties (Yadav et al. 2023): keep the `density` share of each tau_i with the largest magnitude, elect a sign per
  entry from the sum of the trimmed tau_i, and average only the entries that agree with it (a disjoint mean);
- dare_linear (Yu et al. 2023): drop each entry of tau_i with probability 1 - density and rescale the survivors by
  1 / density, so each tau_i keeps its expected value; then sum;
- dare_ties: DARE's drop and rescale, then TIES' sign election and disjoint mean.

DARE draws from one torch.Generator seeded by `seed` and consumed in module order, so a boot is reproducible.
At density 1 every method keeps every entry, and a single adapter then reproduces itself exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from server.merge.kinds import LayerDelta

Method = Literal["linear", "ties", "dare_linear", "dare_ties"]


@dataclass(frozen=True)
class MixSpec:
    method: Method = "linear"
    density: float = 1.0
    seed: int = 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the round(density * n) entries of largest magnitude (ties broken by topk's order)."""
    keep = max(1, min(tau.numel(), round(density * tau.numel())))
    if keep == tau.numel():
        return tau
    flat = tau.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    return (flat * mask).reshape(tau.shape)


def _drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability density and divide survivors by density: E[result] = tau."""
    if density >= 1.0:
        return tau
    # Draw on the CPU so the same seed gives the same mask on every device.
    keep = torch.rand(tau.shape, generator=generator) < density
    return torch.where(keep.to(tau.device), tau / density, torch.zeros_like(tau))


def skip_draws(shape: torch.Size, count: int, spec: MixSpec, generator: torch.Generator | None) -> None:
    """Advance `generator` exactly as `combine` does for `count` deltas of `shape`, without making the deltas.

    The export writes layers in file order, not module order; it replays the draws once to learn where each layer's
    turn starts. Only DARE draws, one uniform sample per entry per adapter (see `_drop`).
    """
    if generator is None or spec.method not in ("dare_linear", "dare_ties") or spec.density >= 1.0:
        return
    for _ in range(count):
        torch.rand(shape, generator=generator)


def _disjoint_mean(taus: torch.Tensor) -> torch.Tensor:
    """Elect each entry's sign from the sum over adapters; average the entries that carry that sign."""
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
    agree = taus.sign() == elected  # zeros (trimmed or dropped) never agree, so they do not dilute the mean
    total = (taus * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def combine(taus: list[torch.Tensor], spec: MixSpec, generator: torch.Generator | None) -> torch.Tensor:
    """One layer's merged delta from its weighted per-adapter deltas (all float32, same shape)."""
    if spec.method == "linear" or not taus:
        out = torch.zeros_like(taus[0]) if taus else torch.zeros(())
        for tau in taus:
            out += tau
        return out
    if spec.method == "ties":
        return _disjoint_mean(torch.stack([_trim(t, spec.density) for t in taus]))
    assert generator is not None, "DARE needs a seeded generator"
    dropped = [_drop(t, spec.density, generator) for t in taus]
    if spec.method == "dare_linear":
        return torch.stack(dropped).sum(dim=0)
    return _disjoint_mean(torch.stack(dropped))


@contextmanager
def deltas_on_the_side(peft_model: nn.Module, layers: list[tuple[LoraLayer, LayerDelta]]) -> Iterator[nn.Module]:
    """The base model computing  W0 x + D x  for each layer's combined delta D, without writing any weight.

    The reference the merged weights are checked against when the mix is not the exact sum (which the unmerged
    PEFT model computes by itself). Costs one float32 delta per adapted layer while it lasts.
    """
    handles = []
    for layer, delta in layers:
        base = cast(nn.Module, layer.get_base_layer())

        def side(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor, d: LayerDelta = delta) -> torch.Tensor:
            x = args[0]
            if isinstance(module, nn.Embedding):
                extra = F.embedding(x, d.weight)
            elif isinstance(module, nn.Linear):
                extra = F.linear(x.float(), d.weight)
            else:  # Conv1D stores (in, out)
                extra = x.float() @ d.weight
            if d.bias is not None:
                extra = extra + d.bias
            return out + extra.to(out.dtype)

        handles.append(base.register_forward_hook(side))
    # Only the LoRA layers step aside: modules_to_save copies stay in use, as they do in the merged model.
    for layer, _ in layers:
        layer.enable_adapters(False)
    try:
        yield peft_model
    finally:
        for handle in handles:
            handle.remove()
        for layer, _ in layers:
            layer.enable_adapters(True)
            cast(nn.Module, layer).requires_grad_(False)  # enable_adapters(True) made the adapter trainable
