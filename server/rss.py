"""This process's resident memory, read from /proc/self/status: the figure memory bounds are stated in.

VmHWM is the peak resident set since the process started (or since it was last reset through clear_refs): the number
the kernel's OOM killer weighs against the machine's memory, and the one issue 27's bounds are given in. It counts
file pages mapped in (a safetensors checkpoint read through mmap) as well as anonymous ones, so a lazily loaded model
shows up as it is touched. Off Linux there is no /proc: every reader returns None and callers report nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

_STATUS = Path("/proc/self/status")


def status_kib(field: str) -> int | None:
    """One `VmXXX:` field of /proc/self/status in KiB, or None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    kib = status_kib("VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes() -> int | None:
    kib = status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so a later peak is the work's own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
