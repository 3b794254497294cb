"""Merging a layer that accelerate offloaded to disk, and putting its merged weights back on disk.

With `model.max_memory` below the model's size (or a device_map naming "disk"), accelerate keeps the layers that do
not fit as meta tensors and loads each one inside its forward from a weights map on disk (`_hf_hook`). The merge
must load such a layer, write W0 + delta into it and send it back to disk; PEFT's `onload_layer` means to, but
replaces the weights map by an in-memory dict before it checks whether the layer came from disk, so the check never
passes and every merged offloaded layer stays in memory: a 1.07B bf16 model capped at 1 GiB peaked at 2.94 GiB of
RSS after its merge, more than the whole model.

Here a disk-offloaded base layer's merged tensors are written to `<offload_folder>/merged/<module>/` in accelerate's
offload format (one memory-mapped .dat file per tensor and an index), and its hook reads them from there, so the
merged layer leaves memory as soon as its forward ends, as the unmerged one did. Layers offloaded to CPU memory, or
not at all, keep PEFT's handling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook
from accelerate.utils import OffloadedWeightsLoader, named_module_tensors, offload_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import onload_layer


def _disk_hook(module: Any) -> AlignDevicesHook | None:
    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, AlignDevicesHook) and hook.offload and torch.device("meta") in hook.original_devices.values():
        return hook
    return None


def _folder(hook: AlignDevicesHook) -> tuple[Path, str] | None:
    """(offload folder, the module's key prefix) from the hook's weights map: transformers hands accelerate a
    `PrefixedDataset` over an `OffloadedWeightsLoader` whose `save_folder` is `model.offload_folder`."""
    dataset = getattr(hook.weights_map, "dataset", None)
    folder = getattr(dataset, "save_folder", None)
    prefix = getattr(hook.weights_map, "prefix", None)
    return (Path(folder), str(prefix).rstrip(".")) if folder and prefix else None


@contextmanager
def onloaded(layer: LoraLayer) -> Iterator[None]:
    """`layer`'s weights loaded for the block; a disk-offloaded base layer's merged weights go back to disk after
    it, under the offload folder (see the module docstring); anything else: PEFT's `onload_layer`."""
    base = layer.get_base_layer()
    hook = _disk_hook(base)
    where = _folder(hook) if hook is not None else None
    if hook is None or where is None:
        with onload_layer(layer):
            yield
        return
    folder, name = where
    hook.pre_forward(base)
    try:
        yield
        tensors = {key: t.detach().to("cpu") for key, t in named_module_tensors(base)}
        target = folder / "merged" / name
        offload_state_dict(str(target), tensors)
        hook.weights_map = OffloadedWeightsLoader(save_folder=str(target))
    finally:
        hook.post_forward(base, torch.tensor([]))  # the layer's tensors back to meta: read from disk per forward
