"""A mergeserve process on a free loopback port, for the benchmark, A/B and soak scripts and tests/live_server.py.

`python -m server serve` runs from the repository root with its output in a log file (a file, not a pipe: nobody
drains a pipe, and a full one would block the server). `wait_healthy` polls /health until boot is done; `stop` sends
SIGTERM, which drains in-flight requests and exits 0, and kills only a process that outlives the grace period.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_loopback(url: str, tool: str) -> str:
    """The URL without a trailing slash, if it names this machine; these tools never load another host."""
    host = urlparse(url).hostname or ""
    with contextlib.suppress(ValueError, OSError):
        if ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
            return url.rstrip("/")
    raise SystemExit(f"{tool}: {url}: only loopback servers may be driven (127.0.0.0/8, ::1, localhost)")


class LocalServer:
    """A started `serve` process; `program` replaces `python -m server` (an installed entry point, a test double)."""

    def __init__(self, config: str | Path, *extra: str, log: Path | None = None, prefix: str = "mergeserve",
                 port: int | None = None, program: Sequence[str] = (), cwd: Path = REPO,
                 env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log is None:
            fd, name = tempfile.mkstemp(prefix=f"{prefix}-server-{self.port}-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = log
        self.health_history: list[int] = []  # every /health status seen while booting: 503s, then the 200
        args = [*(program or (sys.executable, "-m", "server")), "serve", "--config", str(Path(config).resolve()),
                "--host", "127.0.0.1", "--port", str(self.port), *extra]  # fmt: skip
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, cwd=cwd, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until /health answered 200; raises if the process exits or the timeout passes first."""
        start = time.monotonic()
        with httpx.Client(trust_env=False, timeout=5) as client:
            while time.monotonic() - start < timeout:
                if self.proc.poll() is not None:
                    last = "\n".join(self.read_log().splitlines()[-15:])
                    raise RuntimeError(f"server exited with code {self.proc.returncode} during boot:\n{last}")
                try:
                    status = client.get(f"{self.url}/health").status_code
                except httpx.TransportError:  # not listening yet: ask again soon
                    time.sleep(0.2)
                    continue
                self.health_history.append(status)
                if status == 200:
                    return time.monotonic() - start
                time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s; log {self.log}")

    def stop(self, grace: float = 30.0, sig: signal.Signals = signal.SIGTERM) -> int:
        """Exit code after `sig` (SIGTERM or SIGINT: both drain in-flight requests); killed if it outlives `grace`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return int(self.proc.returncode)


@contextlib.contextmanager
def running(config: str | Path, *extra: str, boot_timeout: float, prefix: str = "mergeserve") -> Iterator[LocalServer]:
    """A healthy server for the duration of the block, stopped afterwards whatever happens."""
    server = LocalServer(config, *extra, prefix=prefix)
    try:
        server.wait_healthy(boot_timeout)
        yield server
    finally:
        server.stop()
