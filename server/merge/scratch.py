"""Buffers a merge reuses from layer to layer, instead of a fresh weight-sized tensor per step.

A fresh tensor of hundreds of megabytes comes from `mmap` (glibc serves every allocation this large that way), so
each of its pages faults on first write and is unmapped again when it is freed. Merging the 7.4B model wrote about
44 GB of such fresh float32 and bf16 temporaries (B @ A, W0 + delta, its rounding), and page faults, not
arithmetic, took most of the 82 s merge. A buffer reused per role faults once, at the largest layer's size.
"""

from __future__ import annotations

import math

import torch


class Scratch:
    """One flat buffer per (role, dtype, device), grown to the largest request and handed out as views.

    A view is valid until the next `take` of the same role: callers use it within one layer's step.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, role: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (role, dtype, device)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self._flat[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)

    def clear(self) -> None:
        self._flat.clear()
