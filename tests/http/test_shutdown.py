"""Graceful shutdown of a real `python -m server serve` process (tiny model): SIGTERM turns /health and new requests
to 503, lets the requests in flight finish, and exits 0.

The tiny model makes a token in about a millisecond, so generation alone cannot be relied on to still be running
when the signal lands. One client therefore sends its body slowly: that request is in flight for a known time
(UPLOAD_PAUSE) after SIGTERM, and the generation requests sent with it must all finish too.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.live_server import LiveServer

# One request at a time, each long: a queue of work that is still in flight when the signal comes.
LIMITS = {"max_input_tokens": 64, "max_total_tokens": 256, "max_new_tokens": 180, "max_batch_size": 1}
IN_FLIGHT = 8
UPLOAD_PAUSE = 3.0


def _stream(url: str, results: list[Any], first_token: threading.Event) -> None:
    body = {"inputs": "Arr", "parameters": {"max_new_tokens": 180, "details": True}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                first_token.set()
        results.append((r.status_code, events[-1]))


def _generate(url: str, results: list[Any]) -> None:
    r = httpx.post(f"{url}/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 180}}, timeout=120)
    results.append((r.status_code, r.json()))


def _slow_upload(url: str, results: list[Any], started: threading.Event) -> None:
    def body() -> Any:
        yield b'{"inputs": "Arr", '
        started.set()
        time.sleep(UPLOAD_PAUSE)
        yield b'"parameters": {"max_new_tokens": 5}}'

    r = httpx.post(f"{url}/generate", content=body(), headers={"content-type": "application/json"}, timeout=120)
    results.append((r.status_code, r.json()))


def test_sigterm_drains_in_flight_requests_then_exits_0(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["limits"] = LIMITS
    tiny_config_data["server"] = {"shutdown_grace_seconds": 60}
    with LiveServer(write_config(tiny_config_data), boot_timeout=120) as server:
        assert server.proc is not None
        results: list[Any] = []
        first_token, uploading = threading.Event(), threading.Event()
        threads = [threading.Thread(target=_stream, args=(server.url, results, first_token))]
        threads += [threading.Thread(target=_generate, args=(server.url, results)) for _ in range(IN_FLIGHT - 2)]
        for t in threads:
            t.start()
        # The upload starts once generation is under way, so its pause runs after the signal however long the
        # queue ahead of the stream took (a loaded CI machine once needed over UPLOAD_PAUSE for it).
        assert first_token.wait(60)
        threads.append(threading.Thread(target=_slow_upload, args=(server.url, results, uploading)))
        threads[-1].start()
        assert uploading.wait(60)
        time.sleep(0.3)  # the slow upload's headers have reached the app
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        health = httpx.get(f"{server.url}/health", timeout=10)
        late = httpx.post(f"{server.url}/generate", json={"inputs": "Arr"}, timeout=10)
        for t in threads:
            t.join(120)
        code = server.proc.wait(30)
        stopped_after = time.monotonic() - signalled
        log = server.read_log()
    assert health.status_code == 503 and health.json()["error_type"] == "healthcheck", log
    assert late.status_code == 503 and late.json() == {"error": "Server is shutting down", "error_type": "unhealthy"}
    assert len(results) == IN_FLIGHT
    for status, last in results:
        assert status == 200, last
        assert "error" not in last and last["generated_text"] is not None
    assert code == 0 and stopped_after >= UPLOAD_PAUSE - 1, log
    assert "draining" in log and "drained" in log and "Traceback" not in log
