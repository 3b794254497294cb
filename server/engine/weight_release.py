"""Giving a weight's memory back once a packed copy has replaced it, so that packing does not double the model.

Where the weight lives decides how:

- A tensor transformers loaded from safetensors is a window on the file, memory-mapped privately (`rw-p`): its read
  pages are page cache mapped into this process, and the pages a merge wrote are private copies (anonymous memory).
  Both count in RSS for as long as the mapping lives, and it lives while any tensor of that shard does (the norms
  and embeddings outlive the linear layers). Dropping the tensor frees nothing; `madvise(MADV_DONTNEED)` on the
  pages wholly inside it unmaps them now (a private mapping forgets its copies; a later read would see the file's
  bytes again, which is why the tensor is emptied first, so nothing can read it).
- Any other tensor (a merged twin's weight, a converted dtype) owns its memory: emptying it frees it.

The tensor's Parameter object is emptied in place (`param.data = <0 elements>`), not just dropped, so a module that
still held it would fail on a shape error instead of computing with a stale or unmapped weight.
"""

from __future__ import annotations

import bisect
import ctypes
import os
from dataclasses import dataclass, field

import torch

MADV_DONTNEED = 4  # Linux, every architecture


@dataclass
class FileMappings:
    """This process's private file mappings (start, end), read once from /proc/self/maps; empty where there is no
    /proc (then nothing is advised, and only owned memory is freed)."""

    ranges: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def read(cls) -> FileMappings:
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split()
                    if len(fields) >= 6 and fields[5].startswith("/") and fields[1].endswith("p"):
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        ranges.append((start, end))
        except OSError:
            return cls()
        return cls(sorted(ranges))

    def holds(self, address: int) -> bool:
        at = bisect.bisect_right(self.ranges, (address, float("inf"))) - 1
        return at >= 0 and self.ranges[at][0] <= address < self.ranges[at][1]


def _advise_dontneed(address: int, nbytes: int) -> int:
    """Unmap the pages wholly inside [address, address + nbytes); returns the bytes advised. The partial pages at
    either end are shared with the neighbouring tensors in the file and are left."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) != 0:
        return 0  # nothing was unmapped; the memory stays counted, which the boot's peak RSS shows
    return end - start


def release(param: torch.Tensor, mappings: FileMappings) -> int:
    """Empty `param` and give its memory back; returns the bytes of a file mapping advised away (0 for owned memory,
    which the allocator frees when its last reference goes). The caller guarantees no other module reads it."""
    if param.device.type != "cpu" or param.numel() == 0:
        return 0
    address, nbytes = param.data_ptr(), param.numel() * param.element_size()
    mapped = mappings.holds(address)
    param.data = param.data.new_empty(0)
    return _advise_dontneed(address, nbytes) if mapped else 0
