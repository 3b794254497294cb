"""A model thread that dies (an exception escaping the scheduler's loop) is not a server that still says it is fine:
/health turns to TGI's 503 "unhealthy", and the serving process exits non-zero, so an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest
from server.http.app import create_app
from tests.conftest import boot_tiny
from tests.dying_engine import POISON_LENGTH
from tests.live_server import LiveServer


@pytest.fixture(scope="module")
def tiny(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return boot_tiny(tmp_path_factory.mktemp("death"), tiny_base, tiny_adapters["alpha"], max_new_tokens=4)


def test_a_dead_model_thread_turns_health_to_503(tiny: Any) -> None:
    config, booted = tiny
    engine = Engine(booted.arms, booted.tokenizer, booted.info, config.limits)  # its own scheduler thread, to kill
    closed = asyncio.new_event_loop()
    closed.close()  # emitting to it raises RuntimeError, in the request's failure path as well as for its tokens
    try:
        with TestClient(create_app(engine, config)) as client:
            assert client.get("/health").status_code == 200
            request = PreparedRequest(input_ids=engine.tokenize("Arr"), params=SamplingParams(), max_new_tokens=3)
            engine.submit(request, lambda item, gen: closed.call_soon_threadsafe(print, item))
            behind: queue.Queue[Any] = queue.Queue()  # a request queued behind the fatal one
            try:
                engine.submit(request, lambda item, gen: behind.put(item))
            except RuntimeError as exc:  # it came after the death: refused at once, which is fine too
                behind.put(exc)
            thread = engine.scheduler._thread
            thread.join(timeout=60)
            assert not thread.is_alive()  # the set-up did kill the model thread
            r = client.get("/health")
            assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
            outcome = behind.get(timeout=60)  # failed with the engine, not left waiting
            assert isinstance(outcome, RuntimeError) and "model thread died" in str(outcome)
            # A request sent to the dead engine is answered at once instead of waiting for a thread that is gone.
            r = client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 424 and "model thread died" in r.json()["error"]
    finally:
        engine.close()


def _poisoned_request(url: str) -> None:
    # Its error went to a closed event loop, so no answer comes: the connection ends when the server does.
    body = {"inputs": "Arr matey " * POISON_LENGTH, "parameters": {"max_new_tokens": 4}}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{url}/generate", json=body, timeout=120)


def test_a_dead_model_thread_makes_the_server_exit_non_zero(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["limits"]["max_input_tokens"] = 100
    tiny_config_data["limits"]["max_total_tokens"] = 120
    executable = [sys.executable, "-m", "tests.dying_engine"]
    with LiveServer(write_config(tiny_config_data), boot_timeout=120, executable=executable) as server:
        assert server.proc is not None
        threading.Thread(target=_poisoned_request, args=(server.url,), daemon=True).start()
        code = server.proc.wait(timeout=90)  # on its own: nobody signals it
        log = server.read_log()
    assert code != 0, log
    why = [line for line in log.splitlines() if line.startswith("mergeserve: model thread died")]
    assert len(why) == 1 and "RuntimeError" in why[0], log
