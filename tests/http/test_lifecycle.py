"""A request's lifetime: every path that opens its in-flight count closes it, a client that hangs up stops its
decode steps, and validating a huge body never stalls the event loop.

The disconnect and event-loop tests run the app under a real uvicorn on loopback (in a thread, so the test can
hold the model or the tokenizer at a chosen point and observe the order in which things happen).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast

from server.config.schema import Config
from server.engine.engine import Engine
from server.engine.token_floor import token_floor
from server.http.app import create_app
from server.http.tgi_protocol import Parameters
from server.http.validation import validate
from tests.conftest import boot_tiny
from tests.live_server import free_port
from tests.wrapped_model import Wrapped

SAFETY_SECONDS = 15.0  # only bounds a wait that the broken behaviour would make endless; never asserted on


@pytest.fixture(scope="module")
def tiny(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return boot_tiny(tmp_path_factory.mktemp("lifecycle"), tiny_base, tiny_adapters["alpha"], max_new_tokens=8)


def _in_flight(app: FastAPI) -> float:
    value = app.state.metrics.registry.get_sample_value(
        "mergeserve_requests_in_flight", {"mode": "merged", "adapter": "alpha"}
    )
    return 0.0 if value is None else float(value)


def _wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + SAFETY_SECONDS
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn on a loopback port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: server.started), "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SAFETY_SECONDS)


# --- 3: the in-flight gauge and the seed bound ---------------------------------------------------------------------


def test_seed_past_uint64_is_refused_on_every_route(tiny: tuple[Config, Engine]) -> None:
    config, engine = tiny
    app = create_app(engine, config)
    client = TestClient(app, raise_server_exceptions=False)
    for seed in (2**64, 2**70):
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Arr", "seed": seed})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "BadRequestError" and r.json()["error"]["param"] == "seed"
        r = client.post("/generate", json={"inputs": "Arr", "parameters": {"seed": seed}})
        assert r.status_code == 422 and r.json()["error_type"] == "validation" and "seed" in r.json()["error"]
    # The largest seed a torch generator takes is still served, and reported back as given.
    top = 2**64 - 1
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Arr", "max_tokens": 2, "seed": top})
    assert r.status_code == 200, r.text
    params = {"max_new_tokens": 2, "do_sample": True, "seed": top, "details": True}
    r = client.post("/generate", json={"inputs": "Arr", "parameters": params})
    assert r.status_code == 200 and r.json()["details"]["seed"] == top
    assert _in_flight(app) == 0


FAILING_REQUESTS = [
    ("/generate", {"inputs": "Arr"}),
    ("/generate_stream", {"inputs": "Arr"}),
    ("/", {"inputs": "Arr"}),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "Arr"}),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "Arr", "stream": True}),
]


@pytest.mark.parametrize(("path", "body"), FAILING_REQUESTS)
def test_a_bug_after_the_tracker_opens_still_closes_it(
    tiny: tuple[Config, Engine], monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]
) -> None:
    config, engine = tiny
    app = create_app(engine, config)
    client = TestClient(app, raise_server_exceptions=False)

    def broken(text: str, **_: Any) -> list[int]:
        raise KeyError("a bug in tokenization")

    monkeypatch.setattr(engine, "tokenize", broken)
    r = client.post(path, json=body)
    assert r.status_code == 500, r.text
    assert _in_flight(app) == 0


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/generate", {"inputs": "Arr", "parameters": {"max_new_tokens": 500}}, 422),
        ("/generate_stream", {"inputs": "Arr", "parameters": {"max_new_tokens": 500}}, 422),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "Arr", "max_tokens": 500}, 400),
        ("/generate", {"inputs": "Arr", "parameters": {"max_new_tokens": 3}}, 200),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "Arr", "max_tokens": 3}, 200),
    ],
)
def test_refusals_and_answers_leave_nothing_in_flight(
    tiny: tuple[Config, Engine], path: str, body: dict[str, Any], status: int
) -> None:
    config, engine = tiny
    app = create_app(engine, config)
    r = TestClient(app).post(path, json=body)
    assert r.status_code == status, r.text
    assert _in_flight(app) == 0


# --- 5: a non-streaming client that hangs up stops consuming decode steps -----------------------------------------


class Held(Wrapped):
    """Counts forward passes (prefill and decode steps); the one after `free` waits until released."""

    def __init__(self, inner: nn.Module, free: int) -> None:
        super().__init__(inner)
        self.free = free
        self.calls = 0
        self.release = threading.Event()

    def forward(self, **kw: Any) -> Any:
        self.calls += 1
        if self.calls > self.free:
            self.release.wait(SAFETY_SECONDS)
        return self.inner(**kw)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": "Arr", "parameters": {"max_new_tokens": 80}}),
        ("/", {"inputs": "Arr", "parameters": {"max_new_tokens": 80}}),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "Arr", "max_tokens": 80, "temperature": 0}),
    ],
)
def test_hanging_up_on_a_non_streaming_request_stops_its_decode_steps(
    tiny: tuple[Config, Engine], path: str, body: dict[str, Any]
) -> None:
    config, engine = tiny
    free = 4  # the prefill and three decode steps run; the fifth forward waits while the client hangs up
    held = Held(engine.arms["merged"], free)
    served = Engine({"merged": held}, engine.tokenizer, engine.info, config.limits)
    app = create_app(served, config)
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
    try:
        with serving(app) as url:
            sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            sock.sendall(head.encode() + b"\r\n\r\n" + payload)
            assert _wait_for(lambda: held.calls == free + 1), "the request never reached its fifth forward"
            sock.close()
            # While the model is held, the server can only learn of the hang-up from the socket.
            _wait_for(lambda: _in_flight(app) == 0)
            at_hang_up = held.calls
            held.release.set()
            assert _wait_for(lambda: served.scheduler.load == (0, 0))
    finally:
        held.release.set()
        served.close()
    # Without cancellation the request runs on to 1 prefill + 80 decode steps.
    assert held.calls - at_hang_up <= 1, f"{held.calls - at_hang_up} forwards after the client hung up"
    assert held.calls <= free + 2


# --- 9: a huge body is validated off the event loop, and refused early when it cannot fit -------------------------


def test_validating_a_huge_body_does_not_stall_other_requests(
    tiny: tuple[Config, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, engine = tiny
    real = engine.tokenize
    events: list[str] = []
    gate = threading.Event()

    def held_tokenize(text: str) -> list[int]:
        if len(text) > 10_000:
            events.append("huge: tokenizing")
            gate.wait(SAFETY_SECONDS)  # a server that tokenizes on its event loop cannot answer anyone meanwhile
            events.append("huge: tokenized")
        return real(text)

    monkeypatch.setattr(engine, "tokenize", held_tokenize)
    app = create_app(engine, config)
    # `truncate` keeps the last tokens, so this body is legitimately tokenized whatever its length.
    huge = {"inputs": "Arr matey " * 90_000, "parameters": {"truncate": 8, "max_new_tokens": 2}}

    async def run(url: str) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            pending = asyncio.create_task(c.post("/generate", json=huge))
            while "huge: tokenizing" not in events:
                await asyncio.sleep(0.005)
            assert (await c.get("/health")).status_code == 200
            events.append("health answered")
            stream = {"inputs": "Once upon", "parameters": {"max_new_tokens": 4}}
            async with c.stream("POST", "/generate_stream", json=stream) as s:
                tokens = [line async for line in s.aiter_lines() if line.startswith("data:")]
            events.append(f"stream got {len(tokens)} tokens")
            gate.set()
            return (await pending).status_code

    with serving(app) as url:
        try:
            status = asyncio.run(run(url))
        finally:
            gate.set()
    assert status == 200
    assert events == ["huge: tokenizing", "health answered", "stream got 4 tokens", "huge: tokenized"]


def test_input_too_long_for_any_tokenization_is_refused_without_tokenizing(
    tiny: tuple[Config, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, engine = tiny
    calls: list[int] = []
    real = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", lambda text: calls.append(len(text)) or real(text))
    client = TestClient(create_app(engine, config))
    r = client.post("/generate", json={"inputs": "Arr matey " * 90_000})
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    assert f"less than {config.limits.max_input_tokens} tokens" in r.json()["error"]
    assert calls == []
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Arr matey " * 90_000})
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
    assert calls == []


def test_the_early_bound_never_refuses_an_input_that_fits(tiny: tuple[Config, Engine]) -> None:
    """The longest vocabulary piece, repeated to just inside max_input_tokens, is the densest input there is."""
    config, engine = tiny
    limit = config.limits.max_input_tokens
    vocab = sorted(engine.tokenizer.get_vocab(), key=len, reverse=True)
    pieces = [engine.tokenizer.convert_tokens_to_string([t]) for t in vocab[:20]]
    # The reference: repetitions that really tokenize to one token each (plus BOS), so they fit.
    dense = [p * (limit - 1) for p in pieces if len(engine.tokenize(p * (limit - 1))) <= limit]
    assert dense, "no vocabulary piece tokenizes to one token per repetition"
    assert len(dense[0]) >= (limit - 1) * len(pieces[0]) // 2  # among the longest pieces: near the bound
    floor = token_floor(engine.tokenizer)
    assert floor is not None
    for text in dense:
        prepared = validate(text, Parameters(max_new_tokens=1), engine.tokenize, config.limits, "alpha", floor)
        assert len(prepared.input_ids) <= limit


def test_the_token_floor_is_below_the_real_count_even_where_characters_vanish(tmp_path: Path) -> None:
    """A vocabulary without the symbol for \x04 drops that character (SmolLM2's lacks six control characters)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    lost = "".join(p for p, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str("\x04"))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>"], initial_alphabet=[c for c in alphabet if c != lost]
    )
    tok.train_from_iterator(["Once upon a time, café ☕ naïve pirates"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    floor = token_floor(tokenizer)
    assert floor is not None and floor.dropped == {"\x04"}
    rng = random.Random(0)
    pool = ["\x04", "\x04" * 50, "Once", " upon", " a time", "café", "☕", "\U00040000", "  ", "\n", "x", "€"]
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        assert floor.tokens(text) <= len(tokenizer(text).input_ids), repr(text)
    assert floor.tokens("\x04" * 10_000 + "Once") == 1  # a long run of vanishing characters is not refused
