"""Graceful shutdown: on SIGTERM (or Ctrl-C) drain in-flight requests, then stop, and exit 0.

uvicorn on its own closes the listening socket at the first signal, so a load balancer gets connection refused
instead of a 503 it understands, and it re-raises the signal after shutting down, so the process dies by SIGTERM
(exit 143) or with a KeyboardInterrupt traceback. Here the first signal starts a drain: /health and new requests
answer 503 while requests in flight run on, for up to `server.shutdown_grace_seconds`; then uvicorn shuts down as
usual. A second signal stops at once.

A model thread that dies stops the server too (no drain: nothing can be generated any more); the CLI then exits
non-zero so an orchestrator restarts the process.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from server.http.middleware import Lifecycle

log = logging.getLogger("mergeserve.shutdown")


class GracefulServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        grace_seconds: float,
        engine_death: Callable[[], str | None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.lifecycle, self.grace_seconds = lifecycle, grace_seconds
        self.drain_deadline: float | None = None
        self.engine_death = engine_death  # why the model thread died, or None while it runs (or before boot)
        self.died: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: the drain is our answer to the signal, so uvicorn must not re-raise it.
        name = signal.Signals(sig).name
        if self.drain_deadline is not None or self.should_exit:
            log.warning("%s again: stopping now, cutting %d request(s) short", name, self.lifecycle.active)
            self.should_exit = self.force_exit = True
            return
        self.lifecycle.draining = True
        self.drain_deadline = time.monotonic() + self.grace_seconds
        log.info("%s: draining %d request(s) for up to %gs", name, self.lifecycle.active, self.grace_seconds)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop calls this every 0.1 s; the drain ends when nothing is in flight or time is up."""
        if self.died is None and (death := self.engine_death()) is not None:
            self.died = death
            self.should_exit = True
        if self.drain_deadline is not None and not self.should_exit:
            if self.lifecycle.active == 0:
                log.info("drained: shutting down")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                log.warning("grace period over: shutting down with %d request(s) in flight", self.lifecycle.active)
                self.should_exit = True
        return await super().on_tick(counter)
