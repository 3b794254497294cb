"""Request limits and failures: bad bodies get 422, a request past its deadline ends with a timeout error, and a
failure inside generation is answered (424, or 500 for a bug), counted, and leaves everyone else served.

The faults are injected by wrapping the tiny model: it can be slowed down, and made to fail the prefill of long
prompts, as an out-of-memory on one request would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from server.config.schema import Config
from server.engine.engine import Engine
from server.http.app import create_app
from tests.conftest import boot_tiny
from tests.wrapped_model import Wrapped

POISON_LENGTH = 20  # prompts this long (in tokens) fail in prefill


class Faulty(Wrapped):
    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    def forward(self, **kw: Any) -> Any:
        time.sleep(self.delay)
        if kw["input_ids"].shape[1] >= POISON_LENGTH:
            raise RuntimeError("injected fault: out of memory")
        return self.inner(**kw)


@pytest.fixture(scope="module")
def tiny(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return boot_tiny(tmp_path_factory.mktemp("limits"), tiny_base, tiny_adapters["alpha"], max_new_tokens=4)


def _faulty(tiny: tuple[Config, Engine], delay: float, timeout: float | None) -> Iterator[tuple[Any, Engine]]:
    config, engine = tiny
    limits = config.limits.model_copy(update={"request_timeout_seconds": timeout})
    faulty = Engine({"merged": Faulty(engine.arms["merged"], delay)}, engine.tokenizer, engine.info, limits)
    try:
        yield create_app(faulty, config.model_copy(update={"limits": limits})), faulty
    finally:
        faulty.close()


@pytest.fixture
def slow(tiny: tuple[Config, Engine]) -> Iterator[tuple[Any, Engine]]:
    yield from _faulty(tiny, delay=0.05, timeout=0.5)


@pytest.fixture
def flaky(tiny: tuple[Config, Engine]) -> Iterator[tuple[Any, Engine]]:
    yield from _faulty(tiny, delay=0.01, timeout=None)


def _metric(client: TestClient, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(client.get("/metrics").text)
    samples = [s for f in families for s in f.samples if s.name == name]
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"inputs": ""}', "`inputs` cannot be empty"),
        (b'{"inputs": null}', "inputs"),
        (b'{"inputs": "x", "parameters": []}', "parameters"),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": [3]}}', "max_new_tokens"),
        (b'{"inputs": "x", "parameters": {"temperature": NaN}}', "finite number"),
        (b'{"inputs": "\\ud800"}', "lone surrogate"),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": 96}}', "must be <= 96. Given: 1 `inputs` tokens and 96"),
        (b"inputs=x", "body"),
        (b'{"inputs": "x"', "body"),
    ],
)
def test_bad_requests_are_422(tiny: tuple[Config, Engine], body: bytes, words: str) -> None:
    client = TestClient(create_app(tiny[1], tiny[0]))
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and words in r.json()["error"]


def test_timeout_ends_generation_and_frees_the_slot(slow: tuple[Any, Engine]) -> None:
    app, engine = slow
    client = TestClient(app)
    started = time.perf_counter()
    r = client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 60}})
    assert r.status_code == 424 and r.json()["error_type"] == "timeout", r.text
    assert "limits.request_timeout_seconds" in r.json()["error"] and time.perf_counter() - started < 2
    with client.stream("POST", "/generate_stream", json={"inputs": "Arr", "parameters": {"max_new_tokens": 60}}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert events[-1]["error_type"] == "timeout" and len(events) > 1  # tokens first, then the error
    # Greedy, as the TGI routes above: OpenAI's default temperature 1 samples, and a sampled EOS before the deadline
    # would end the stream normally.
    body = {"model": "tiny-llama", "prompt": "Arr", "max_tokens": 60, "stream": True, "temperature": 0}
    with client.stream("POST", "/v1/completions", json=body) as s:
        chunks = [line[5:].strip() for line in s.iter_lines() if line.startswith("data:")]
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2]).get("error", {}).get("type") == "timeout", chunks
    assert client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}}).status_code == 200
    assert _metric(client, "mergeserve_request_failures_total", error_type="timeout") == 3
    assert _metric(client, "mergeserve_requests_in_flight") == 0
    deadline = time.monotonic() + 5
    while engine.scheduler.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.load == (0, 0)


def test_failure_in_generation_fails_that_request_alone(flaky: tuple[Any, Engine]) -> None:
    app, _ = flaky
    poison = " ".join(["pirate"] * POISON_LENGTH * 2)

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            long = asyncio.create_task(
                c.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 80, "details": True}})
            )
            await asyncio.sleep(0.2)  # the long request is decoding when the poisoned one is prefilled
            bad = await c.post("/generate", json={"inputs": poison, "parameters": {"max_new_tokens": 2}})
            after = await c.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}})
            return await long, bad, after

    long, bad, after = asyncio.run(run())
    assert bad.status_code == 424 and bad.json() == {
        "error": "Request failed during generation: injected fault: out of memory",
        "error_type": "generation",
    }
    assert long.status_code == 200 and after.status_code == 200
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    assert _metric(client, "mergeserve_request_failures_total", error_type="generation") == 1
    assert _metric(client, "mergeserve_requests_total") == 2


def test_a_bug_is_500_in_tgi_shape(tiny: tuple[Config, Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    config, engine = tiny
    app = create_app(engine, config)
    client = TestClient(app, raise_server_exceptions=False)

    def broken(text: str) -> list[int]:
        raise KeyError("a bug")

    monkeypatch.setattr(engine, "tokenize", broken)
    r = client.post("/generate", json={"inputs": "Arr"})
    assert r.status_code == 500 and r.json()["error_type"] == "internal" and "KeyError" in r.json()["error"]
    monkeypatch.undo()
    assert client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}}).status_code == 200
    assert _metric(client, "mergeserve_request_failures_total", error_type="internal") == 1


def test_unknown_route_and_method_answer_in_the_error_shapes(tiny: tuple[Config, Engine]) -> None:
    client = TestClient(create_app(tiny[1], tiny[0]))
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "error_type": "not_found"}
    r = client.get("/generate")
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed" and "allow" in r.headers
    r = client.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
