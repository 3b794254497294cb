"""The memory a booting process can still take: the machine's MemAvailable or its cgroup's room, whichever is less.

- MemAvailable (/proc/meminfo): the kernel's estimate of memory that can be given to a new workload without swapping:
  free memory plus the page cache and reclaimable slabs it can drop.
- A cgroup's room: its memory limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) less what it holds other than page
  cache (v2 `memory.current` less `file` in memory.stat; v1 `memory.usage_in_bytes` less `total_cache`), for every
  cgroup from this process's own up to the root (a parent's limit binds its children too). A container's limit is
  what its OOM killer enforces, whatever the host has free.

This process's own resident memory is added back: the estimates it is compared with are a serving process's peak,
which includes the interpreter and torch this process already holds. Swap is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.rss import rss_bytes

# A limit this large is "no limit" (v1 writes 2^63 rounded down to the page size; v2 writes "max").
UNLIMITED = 1 << 60
GIB = 1 << 30


@dataclass(frozen=True)
class Available:
    bytes: int
    source: str  # what the figure is, for the refusal's line


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, *keys: str) -> int:
    """The first of `keys` found in a memory.stat file, else 0."""
    try:
        fields = dict(line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return 0
    return next((int(fields[k]) for k in keys if k in fields), 0)


def meminfo(field: str, proc: Path = Path("/proc")) -> int | None:
    """A /proc/meminfo field in bytes, or None off Linux."""
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_total() -> int:
    """The machine's memory (what vLLM's CPU worker takes its share of), or 0 where unknown."""
    return meminfo("MemTotal") or 0


def _cgroup_dirs(proc: Path, root: Path) -> list[tuple[Path, str]]:
    """(folder, version) of every memory cgroup from this process's up to the root."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():
            base, version = root, "v2"
        elif "memory" in controllers.split(","):
            base, version = root / "memory", "v1"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        found += [(base.joinpath(*parts[:n]), version) for n in range(len(parts), -1, -1)]
    return found


def cgroup_room(proc: Path = Path("/proc"), root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str] | None:
    """(bytes, description) of the tightest cgroup limit on this process's path less what it holds, or None."""
    best: tuple[int, str] | None = None
    for folder, version in _cgroup_dirs(proc, root):
        if version == "v2":
            limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
            cache = _stat(folder / "memory.stat", "file")
        else:
            limit, used = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
            cache = _stat(folder / "memory.stat", "total_cache", "cache")
        if limit is None or limit >= UNLIMITED:
            continue
        held = max((used or 0) - cache, 0)
        room = max(limit - held, 0)
        if best is None or room < best[0]:
            best = (room, f"cgroup {version} limit {limit / GIB:.1f} GiB less {held / GIB:.1f} GiB held")
    return best


def free_memory(proc: Path = Path("/proc"), root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(bytes, what they are): MemAvailable or the tightest cgroup's room, whichever is less."""
    free = meminfo("MemAvailable", proc)
    room = cgroup_room(proc, root)
    candidates = [(free, f"MemAvailable {free / GIB:.1f} GiB")] if free is not None else []
    if room is not None:
        candidates.append(room)
    if not candidates:  # not Linux: nothing to compare with, so nothing is refused
        return UNLIMITED, "unknown: no /proc/meminfo and no cgroup memory limit"
    return min(candidates, key=lambda c: c[0])


def available_memory() -> Available:
    """What a serving process may grow to (see the module docstring): `free_memory` plus this process's own."""
    amount, source = free_memory()
    own = rss_bytes() or 0
    return Available(amount + own, f"{source} + this process's {own / GIB:.1f} GiB")
