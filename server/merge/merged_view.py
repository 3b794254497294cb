"""The unmerged model answering as the merged one would, one layer's merged weight at a time.

Serving unmerged still checks the merge it compares with (the parity gate's candidate). A merged twin holds a merged
copy of every adapted weight at once: on the 1.07B model that is 1.8 GiB beside the 2.0 GiB served, and the
unmerged boot peaked at 5.7 GiB, 2.8x the weights (issue 27 asks for 1.1x + 1.5 GB). Here each LoRA layer gets its
merged weight only while its own forward runs:

- a forward pre-hook forms W0 + delta in float32 and rounds it once to W0's dtype (`merged_slots`, the arithmetic
  the merged arm and its twin use; the weight in buffers reused from layer to layer, server.merge.scratch), checks
  it element by element the first time, puts it in the base layer's slots and turns the layer's side path off, so
  PEFT's forward runs the base layer alone;
- a forward hook (always called, even on an exception) puts the served Parameter back and the side path on.

The served weights are never written, and the same tensor objects come back, so the served arm is bit for bit what
it was. A tied embedding stays tied: only the adapted side's module sees the merged tensor, as the merged twin
unties it. `modules_to_save` copies already replace their modules in the unmerged forward, as merging does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from peft.tuners.lora import LoraLayer
from torch import nn

from server.errors import Refusal
from server.merge.apply import check_mergeable, layer_delta, lora_layers, merged_slots, refuse_writes
from server.merge.kinds import has_adapter
from server.merge.scratch import Scratch


class _MergedUnit:
    """One LoRA layer's merged weight, present for the length of its forward."""

    def __init__(self, name: str, layer: LoraLayer, adapters: list[str], problems: list[tuple[str, Refusal]],
                 scratch: Scratch) -> None:  # fmt: skip
        self.name, self.layer, self.adapters, self.problems = name, layer, adapters, problems
        self.scratch = scratch
        self.checked = False
        self.saved: dict[str, Any] = {}
        self.side_off = False

    def enter(self, module: nn.Module, args: Any) -> None:
        base = cast(nn.Module, self.layer.get_base_layer())
        delta = layer_delta(self.layer, self.adapters, scratch=self.scratch)
        self.saved = {}
        for slot, merged, problem in merged_slots(base, delta, self.scratch, check=not self.checked):
            if problem:
                self.problems.append((self.name, problem))
            self.saved[slot] = base._parameters[slot]
            base._parameters[slot] = nn.Parameter(merged, requires_grad=False)
        self.checked = True
        self.side_off = self.layer._disable_adapters
        self.layer._disable_adapters = True

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        base = cast(nn.Module, self.layer.get_base_layer())
        for slot, served in self.saved.items():
            base._parameters[slot] = served
        self.saved = {}
        self.layer._disable_adapters = self.side_off


@contextmanager
def merged_view(peft_model: nn.Module, adapters: list[str]) -> Iterator[nn.Module]:
    """`peft_model` computing as if `adapters` were merged into it (see the module docstring). Raises MergeError at
    the end if a merged weight was not W0 + delta rounded once, as the merge itself would."""
    check_mergeable(peft_model, adapters)
    problems: list[tuple[str, Refusal]] = []
    scratch = Scratch()  # LoRA layers run one at a time: one set of buffers serves them all
    handles = []
    for name, layer in lora_layers(peft_model):
        if any(has_adapter(layer, a) for a in adapters):
            unit = _MergedUnit(name, layer, adapters, problems, scratch)
            module = cast(nn.Module, layer)
            handles.append(module.register_forward_pre_hook(unit.enter))
            handles.append(module.register_forward_hook(unit.leave, always_call=True))
    try:
        yield peft_model
    finally:
        for handle in handles:
            handle.remove()
        scratch.clear()
    refuse_writes(problems)
