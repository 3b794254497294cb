"""A real `serve` process on a free loopback port for end-to-end tests: scripts/local_server.py's, as a `with` block.

Starting, waiting for /health and stopping are scripts/local_server.LocalServer's (the benchmark and A/B scripts use
the same code). Here: the process starts on entering the block, not on construction (the port is known before, for
a Prometheus scrape config); it stops with SIGINT (Ctrl-C, which must drain and exit 0); the log is a temporary file
deleted with the object; and a failed boot raises with the whole log, after stopping the process.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

# scripts/ is not a package: its modules import each other by bare name, as they do when run as scripts.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from local_server import REPO, LocalServer, free_port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LiveServer:
    def __init__(self, config: Path, *extra: str, boot_timeout: float = 420.0, executable: list[str] | None = None,
                 cwd: Path = REPO, env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config, self.extra, self.boot_timeout = config, extra, boot_timeout
        self.program, self.cwd, self.env = executable or [], cwd, env
        self.log_file = tempfile.NamedTemporaryFile(prefix="mergeserve-", suffix=".log")  # noqa: SIM115
        self.local: LocalServer | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.local.proc if self.local else None

    @property
    def health_history(self) -> list[int]:
        return self.local.health_history if self.local else []

    def __enter__(self) -> LiveServer:
        self.local = LocalServer(self.config, *self.extra, log=Path(self.log_file.name), port=self.port,
                                 program=self.program, cwd=self.cwd, env=self.env)  # fmt: skip
        try:
            self.local.wait_healthy(self.boot_timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}\nfull log:\n{self.stop()}") from None
        return self

    def stop(self) -> str:
        """Stop with SIGINT, as Ctrl-C would; the log so far."""
        if self.local is not None:
            self.local.stop(sig=signal.SIGINT)
        return self.read_log()

    def read_log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
