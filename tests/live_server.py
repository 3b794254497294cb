"""Run `python -m server serve` as a real process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LiveServer:
    def __init__(
        self,
        config: Path,
        *extra: str,
        boot_timeout: float = 420.0,
        executable: list[str] | None = None,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        program = executable or [sys.executable, "-m", "server"]
        self.args = [
            *program,
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra,
        ]
        self.cwd, self.env = cwd, env
        self.boot_timeout = boot_timeout
        self.health_history: list[int] = []
        # A file, not a pipe: nobody drains a pipe while the server runs, and a full pipe would block its logging.
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="mergeserve-", suffix=".log")  # noqa: SIM115
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LiveServer:
        env = {**(self.env or os.environ), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, text=True
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stop()}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            self.health_history.append(status)
            if status == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {self.boot_timeout}s:\n{self.stop()}")

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.read_log()

    def read_log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
