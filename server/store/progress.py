"""Progress of `mergeserve merge` while it writes shards: a tqdm bar on a terminal, one log line per shard otherwise.

A container's log or a CI job keeps every carriage-return redraw of a bar, so off a terminal each finished shard
gets one line instead, with the bytes written so far and the seconds since writing began.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm.auto import tqdm

from server.store.checkpoint import Written

log = logging.getLogger("mergeserve.export")


class ShardProgress:
    """Called by `write_sharded` after each tensor; use as a context manager so the bar is closed on errors too."""

    def __init__(self, total_bytes: int, terminal: bool | None = None) -> None:
        self.total = total_bytes
        self.done = 0
        self.start = time.perf_counter()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merge", leave=True) if terminal else None

    def __call__(self, written: Written) -> None:
        self.done += written.nbytes
        if self.bar is not None:
            self.bar.set_description(f"merge: shard {written.shard}/{written.shards}")
            self.bar.update(written.nbytes)
        elif written.last:
            seconds = time.perf_counter() - self.start
            log.info("export: shard %d/%d %s written (%.0f MB; %.0f of %.0f MB, %.1fs)", written.shard,
                     written.shards, written.file, written.shard_bytes / 1e6, self.done / 1e6, self.total / 1e6,
                     seconds)  # fmt: skip

    def __enter__(self) -> ShardProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()
