"""The exact function's logits: the unmerged model run in float32, one module upcast at a time.

A half-precision model and its merge are two noisy approximations of one exact function, the unmerged model (LoRA on
the side) computed in float32; the parity gate (server.merge.parity) measures both against it. Upcasting the whole
model for that costs 2x its bytes in bf16/fp16 (a 7.4B bf16 merge was OOM-killed at 22.9 GB doing so on a 24 GB
machine). Here each module that holds weights gets a float32 copy of them only while its own forward runs:

- a forward pre-hook swaps float32 copies of the module's half-precision tensors into its `_parameters`/`_buffers`,
  and a forward hook (always called, even on an exception) puts the original tensor objects back. The served
  weights are never written: the very same storage comes back, bit for bit, so whatever shares it (a tied
  embedding, the `ab` twin's unadapted layers) is untouched. Activations leave each module in float32 and stay so.
- a LoRA layer is one unit with its base layer, A, B and DoRA magnitude: DoRA reads the base weight directly, not
  through the base layer's forward.
- a plain `nn.Embedding` returns its rows cast to float32 (exact), instead of upcasting the whole table to look up a
  few dozen tokens: at vocab 49152 x 4096 that table is 805 MB in float32.

Linear and LoRA layers write their float32 copies into one buffer reused from module to module (`_Scratch`), so
peak extra memory is the largest single module's float32 weights (a 4096 x 14336 MLP projection: 235 MB; an untied
LM head of 49152 x 4096: 805 MB) plus the probes' float32 activations, instead of 2x the model.

Offloaded weights (meta tensors: accelerate loads them inside the module's forward, after these hooks run) are not
upcast: `float32_probe_logits` skips and says why, and the gate falls back to the serving dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from server.merge.parity import probe_logits


def _half_slots(modules: list[nn.Module]) -> list[tuple[dict[str, Any], str]]:
    """(table, name) of every floating tensor not in float32 held directly by `modules` (parameters and buffers)."""
    slots = []
    for module in modules:
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                    slots.append((table, name))
    return slots


class _Scratch:
    """Float32 buffers that matmul units write their upcast weights into, one per nesting level of running units.

    Reused from module to module, so a pass allocates (and page-faults) the largest unit's float32 size once instead
    of a fresh copy per module, which the allocator then partly keeps: on a 6-layer bf16 test model with 16.8 MB
    float32 projections the pass peaked at +44 to +59 MiB with fresh copies, +33 to +36 MiB with this. Only modules
    whose forward returns a new tensor (a matmul) may use it: a view of a weight that a forward returned would see
    the next module's weights.
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.level = 0

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        if self.level == len(self.buffers):
            self.buffers.append(torch.empty(0, device=device))
        buffer = self.buffers[self.level]
        if buffer.numel() < numel or buffer.device != device:
            buffer = self.buffers[self.level] = torch.empty(numel, dtype=torch.float32, device=device)
        self.level += 1
        return buffer

    def give_back(self) -> None:
        self.level -= 1


class _Upcast:
    """Swaps float32 copies into a module's tensor slots for the length of its forward (re-entrant)."""

    def __init__(self, slots: list[tuple[dict[str, Any], str]], scratch: _Scratch | None) -> None:
        self.slots = slots
        self.scratch = scratch if len({table[name].device for table, name in slots}) == 1 else None
        self.saved: list[Any] = []
        self.depth = 0
        self.took = False

    def enter(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth > 1:
            return
        self.saved = [table[name] for table, name in self.slots]
        buffer, offset = None, 0
        if self.scratch is not None:
            buffer = self.scratch.take(sum(t.numel() for t in self.saved), self.saved[0].device)
            self.took = True
        for (table, name), tensor in zip(self.slots, self.saved, strict=True):
            if buffer is None:
                upcast = tensor.detach().float()
            else:
                upcast = buffer[offset : offset + tensor.numel()].view(tensor.shape).copy_(tensor.detach())
                offset += tensor.numel()
            table[name] = nn.Parameter(upcast, requires_grad=False) if isinstance(tensor, nn.Parameter) else upcast

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.restore()

    def restore(self) -> None:
        if not self.saved:
            return
        for (table, name), tensor in zip(self.slots, self.saved, strict=True):
            table[name] = tensor
        self.saved = []
        if self.took and self.scratch is not None:
            self.scratch.give_back()
            self.took = False


def _float_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


# Modules whose forward returns a fresh tensor computed from their weights, never a view of them.
_MATMULS = (nn.Linear, Conv1D)


def _plain_embedding(module: nn.Module) -> bool:
    """Row lookup only: a subclass may scale or renormalize its rows in the weight's dtype."""
    return type(module) is nn.Embedding and module.max_norm is None


@contextmanager
def layered_float32(model: nn.Module) -> Iterator[nn.Module]:
    """`model` computing in float32, each module's weights upcast only while it runs (see the module docstring)."""
    units: list[_Upcast] = []
    handles = []
    scratch = _Scratch()

    def visit(module: nn.Module) -> None:
        if isinstance(module, LoraLayer):
            unit = _Upcast(_half_slots(list(module.modules())), scratch)
        elif _plain_embedding(module):
            handles.append(module.register_forward_hook(_float_output))
            return
        else:
            unit = _Upcast(_half_slots([module]), scratch if isinstance(module, _MATMULS) else None)
            for child in module.children():
                visit(child)
        if unit.slots:
            units.append(unit)
            handles.append(module.register_forward_pre_hook(unit.enter))
            handles.append(module.register_forward_hook(unit.leave, always_call=True))

    visit(model)
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for unit in units:
            unit.restore()
        # `visit` refers to itself, so this frame's locals live in a reference cycle until the garbage collector
        # runs; the scratch buffer (the largest unit's float32 weights: 403 MB for the 1.07B model's head) must
        # not wait for that: the merge that follows peaked 0.4 GiB higher while it did.
        scratch.buffers.clear()


def offloaded(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def float32_probe_logits(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, probes: list[str]
) -> tuple[list[torch.Tensor] | None, str | None]:
    """(the unmerged model's float32 probe logits, None), or (None, why they were not measured)."""
    if offloaded(model):
        return None, "layers are offloaded to disk (meta tensors), which are only loaded inside their forward"
    try:
        with layered_float32(model):
            return probe_logits(model, tokenizer, probes), None
    except RuntimeError as exc:  # a module reading another's weight directly meets a dtype it did not expect
        return None, f"the model does not run in float32 module by module ({str(exc).splitlines()[0]})"
