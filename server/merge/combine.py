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

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from server.config.schema import COMBINE_METHODS, CombineMethod
from server.merge.kinds import LayerDelta


@dataclass(frozen=True)
class MixSpec:
    method: CombineMethod = "linear"
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
    if generator is None or not STRATEGIES[spec.method].draws or spec.density >= 1.0:
        return
    for _ in range(count):
        torch.rand(shape, generator=generator)


def _disjoint_mean(taus: torch.Tensor) -> torch.Tensor:
    """Elect each entry's sign from the sum over adapters; average the entries that carry that sign."""
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
    agree = taus.sign() == elected  # zeros (trimmed or dropped) never agree, so they do not dilute the mean
    total = (taus * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def _linear(taus: list[torch.Tensor], density: float, generator: torch.Generator | None) -> torch.Tensor:
    out = torch.zeros_like(taus[0])
    for tau in taus:  # in config order, into one float32 buffer: the sum the unmerged model computes
        out += tau
    return out


def _ties(taus: list[torch.Tensor], density: float, generator: torch.Generator | None) -> torch.Tensor:
    return _disjoint_mean(torch.stack([_trim(t, density) for t in taus]))


def _dropped(taus: list[torch.Tensor], density: float, generator: torch.Generator | None) -> torch.Tensor:
    assert generator is not None, "DARE needs a seeded generator"
    return torch.stack([_drop(t, density, generator) for t in taus])


def _dare_linear(taus: list[torch.Tensor], density: float, generator: torch.Generator | None) -> torch.Tensor:
    return _dropped(taus, density, generator).sum(dim=0)


def _dare_ties(taus: list[torch.Tensor], density: float, generator: torch.Generator | None) -> torch.Tensor:
    return _disjoint_mean(_dropped(taus, density, generator))


@dataclass(frozen=True)
class Strategy:
    """How one method mixes a layer's taus (non-empty, float32, one shape), given density and the DARE generator."""

    mix: Callable[[list[torch.Tensor], float, torch.Generator | None], torch.Tensor]
    draws: bool  # consumes one uniform sample per entry per adapter from the generator (`skip_draws` replays them)


STRATEGIES: Mapping[CombineMethod, Strategy] = MappingProxyType(
    {
        "linear": Strategy(_linear, draws=False),
        "ties": Strategy(_ties, draws=False),
        "dare_linear": Strategy(_dare_linear, draws=True),
        "dare_ties": Strategy(_dare_ties, draws=True),
    }
)
if set(STRATEGIES) != set(COMBINE_METHODS):  # a method the config accepts but nothing implements, or vice versa
    raise ImportError(f"combine strategies {sorted(STRATEGIES)} != config methods {sorted(COMBINE_METHODS)}")


def combine(taus: list[torch.Tensor], spec: MixSpec, generator: torch.Generator | None) -> torch.Tensor:
    """One layer's merged delta from its weighted per-adapter deltas (all float32, same shape)."""
    if not taus:
        return torch.zeros(())
    return STRATEGIES[spec.method].mix(taus, spec.density, generator)


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
