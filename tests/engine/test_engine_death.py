"""A model thread that dies (an exception escaping the scheduler's loop) is not a server that still says it is fine:
/health turns to TGI's 503 "unhealthy", and the serving process exits non-zero, so an orchestrator restarts it.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
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

    def fault(*_: Any) -> None:
        raise RuntimeError("injected fault")

    # A turn that fails, and failing its lane that fails too (its bookkeeping): what still escapes the loop now
    # that a reader's failing emit no longer does (test_an_emit_that_raises_...).
    lane = next(iter(engine.scheduler.lanes.values()))  # type: ignore[attr-defined]
    lane.turn = lane.fail = fault
    try:
        with TestClient(create_app(engine, config)) as client:
            assert client.get("/health").status_code == 200
            request = PreparedRequest(input_ids=engine.tokenize("Arr"), params=SamplingParams(), max_new_tokens=3)
            engine.submit(request, lambda item, gen: None)
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
    # It gets its error, or the connection ends with the server: either way the server must then exit on its own.
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


def test_an_emit_that_raises_fails_its_request_alone_and_the_model_thread_lives(tiny_base: Path) -> None:
    """Issue 28, item 14: a reader whose `emit` raises (a closed event loop, a broken client queue) for its tokens
    and for its failure too. `_fail_row` used to let the second raise escape the turn, `lane.fail` then emitted to
    the same reader again, and that escaped the loop: the model thread died and every request beside it with it."""
    from server.engine.scheduler import Scheduler
    from server.engine.types import Generation, Token
    from tests.engine.test_kv_slab import _prompt, _req, _slab_model, _Tok

    model = _slab_model(tiny_base)
    vocab = model.config.vocab_size
    scheduler = Scheduler({"m": model}, _Tok(), set(), max_batch_size=4, max_concurrent_requests=4)
    broken_calls: list[Token | BaseException] = []
    served: queue.Queue[Token | BaseException] = queue.Queue()

    def broken(item: Token | BaseException, gen: Generation) -> None:
        broken_calls.append(item)
        raise RuntimeError("emit to a closed event loop")

    def healthy(item: Token | BaseException, gen: Generation) -> None:
        if isinstance(item, BaseException) or gen.finish_reason is not None:
            served.put(item)

    try:
        scheduler.submit(_req(_prompt(1, 5, vocab), 6), broken)
        scheduler.submit(_req(_prompt(2, 7, vocab), 6), healthy)
        outcome = served.get(timeout=60)
        assert isinstance(outcome, Token), f"the healthy request failed: {outcome!r}"
        assert scheduler.death is None and scheduler._thread.is_alive()
        assert isinstance(broken_calls[0], Token) and isinstance(broken_calls[-1], RuntimeError)
        deadline = time.monotonic() + 10  # the finished row leaves the batch just after its last emit
        while scheduler.load != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.load == (0, 0) and scheduler._slots.used == 0  # the broken request's slot is back too
    finally:
        scheduler.close()
