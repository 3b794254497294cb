"""Pieces of scripts/bench_scale.py that measure the machine and the processes, not the servers' answers.

- `cold_read`: how long `cat` takes to read the weight files, after dropping the page cache where the process may
  (root, /proc/sys/vm/drop_caches writable). Boot time targets are multiples of it (issue 27: a cache miss <= 3x).
- `read_bound`: the machine's weight-read bound for one decode step. A bf16 decode step of a dense model reads every
  weight once, so no engine can step faster than bytes / (memory bandwidth). A child process loads the weights into
  anonymous memory and times one pass of a reduction over all of them (best of --reps, several reductions, each
  vectorised by torch over every core); the bound in tokens/s is the rate of the fastest pass. A reduction does no
  more than the decode's matmul-vector products must (read each byte once), so it is a fair ceiling.
- `PeakWatcher`: the peak RSS (VmHWM) of a server process and of every process below it (vLLM's engine core and
  workers), polled while it runs; a process that ended is remembered with the last peak seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench_engines import descendants

READ_BOUND_CHILD = r"""
import json, sys, time
import torch
from safetensors import safe_open
torch.set_num_threads(int(sys.argv[2]))
tensors = []
for path in sys.argv[3:]:
    with safe_open(path, "pt") as f:
        tensors += [f.get_tensor(k).clone() for k in f.keys()]  # anonymous memory, as a loaded model holds it
nbytes = sum(t.numel() * t.element_size() for t in tensors)
words = [t.view(-1).view(torch.int16) if t.element_size() == 2 else t.view(-1).view(torch.int32) for t in tensors]
passes = {
    "amax": lambda: [torch.amax(w) for w in words],
    "sum_float": lambda: [t.view(-1).sum(dtype=torch.float32) for t in tensors],
}
best = {}
for name, run in passes.items():
    run()  # warm-up: page faults and thread start-up are not the bound
    times = []
    for _ in range(int(sys.argv[1])):
        start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
    best[name] = min(times)
print(json.dumps({"bytes": nbytes, "seconds": best}))
"""


def drop_page_cache() -> bool:
    """Sync and drop the page cache (clean pages only); False where this process may not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold_read(files: list[Path]) -> dict[str, Any]:
    """Seconds `cat` takes to read `files` to /dev/null, cold where the cache could be dropped (and it says so)."""
    dropped = drop_page_cache()
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": sum(f.stat().st_size for f in files), "page_cache_dropped": dropped}


def read_bound(files: list[Path], reps: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Bytes per second of the fastest reduction pass over the weights (see the module docstring)."""
    threads = threads or os.cpu_count() or 1
    cmd = [sys.executable, "-c", READ_BOUND_CHILD, str(reps), str(threads), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    got = json.loads(out)
    fastest = min(got["seconds"].values())
    return {"bytes": got["bytes"], "pass_seconds": got["seconds"], "bytes_per_s": got["bytes"] / fastest}


def vm_hwm(pid: int) -> int | None:
    """A process's VmHWM in bytes, None once it is gone."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    return None


class PeakWatcher:
    """Polls the VmHWM of `pid` and its descendants every `interval` s until stopped; `peaks` per pid."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in (self.pid, *descendants(self.pid)):
                if (peak := vm_hwm(pid)) is not None:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, int]:
        """{"server": its own peak, "all": the sum of every process's peak (an upper bound of their joint peak)}."""
        self._stop.set()
        self._thread.join()
        return {"server": self.peaks.get(self.pid, 0), "all": sum(self.peaks.values())}
