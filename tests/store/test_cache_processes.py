"""Two replicas on one cache volume (two pods on a ReadWriteMany claim): two real `serve` processes started together
on one cache folder. One merges while the other waits on the key's lock, then hits; both serve the same tokens, and
the entry they leave verifies."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from server.config.load import load_config
from server.store.cache import MergeCache
from tests.live_server import LocalServer

Writer = Callable[[dict[str, Any]], Path]
WAITING = "merge cache: waiting for another boot"


def _wait_for_log(servers: list[LocalServer], text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for server in servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.read_log()[-3000:]}")
        if all(text in s.read_log() for s in servers):
            return
        time.sleep(0.2)
    logs = "\n---\n".join(s.read_log()[-3000:] for s in servers)
    raise TimeoutError(f"not every server logged {text!r} within {timeout:.0f} s:\n{logs}")


def _served(server: LocalServer) -> tuple[dict[str, Any], list[int]]:
    info = httpx.get(f"{server.url}/info", timeout=30, trust_env=False).json()
    body = {"inputs": "Arr matey, the capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}
    answer = httpx.post(f"{server.url}/generate", json=body, timeout=60, trust_env=False).json()
    return info["cache"], [t["id"] for t in answer["details"]["tokens"]]


def test_two_processes_booting_together_on_one_cache_merge_once(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path
) -> None:
    """The test holds the key's lock while both boot, so both reach it before either merges, whatever their start-up
    times; then it lets go. Both processes inherit MERGESERVE_CACHE_DIR (the merge_cache fixture)."""
    path = write_config(tiny_config_data)
    cache = MergeCache(merge_cache)
    key, _ = cache.key(load_config(path))
    held = cache.lock(key)
    held.acquire()
    servers: list[LocalServer] = []
    try:
        servers = [LocalServer(path, prefix="replica") for _ in range(2)]
        _wait_for_log(servers, WAITING, timeout=240)
        held.release()
        for server in servers:
            server.wait_healthy(300)
        (first, tokens), (second, other_tokens) = (_served(s) for s in servers)
        logs = [s.read_log() for s in servers]
    finally:
        if held.is_locked:  # a boot that failed before the release
            held.release()
        for server in servers:
            server.stop(sig=signal.SIGINT)
            server.log.unlink(missing_ok=True)
    assert sorted([first["status"], second["status"]]) == ["hit", "miss"] and first["key"] == second["key"] == key
    assert sum(log.count(f"merge cache: stored {key}") for log in logs) == 1  # one merge stored, by one process
    assert len(tokens) == 8 and tokens == other_tokens
    manifest, problem = MergeCache(merge_cache).check(key)
    assert manifest is not None and problem is None
    assert sorted(p.name for p in (merge_cache / "entries").iterdir()) == [key]
    assert not [p for p in merge_cache.iterdir() if p.name.startswith(("tmp-", "trash-"))]
