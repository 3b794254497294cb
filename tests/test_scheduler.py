"""The batching scheduler on a tiny real model: batched output equals solo output, seeds hold, slots free up."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.boot import boot
from server.config import load_config
from server.engine import Engine
from server.generation import Generation, PreparedRequest, Token
from server.sampling import SamplingParams
from server.scheduler import Overloaded

PROMPTS = ["Once upon a time", "The capital of France is", "Arr matey", "def fibonacci(n):", "pirate", "Paris"]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("sched") / "config.yaml"
    data = {
        "model": {"path": str(tiny_base), "dtype": "float32"},
        "adapters": [{"name": "alpha", "path": str(tiny_adapters["alpha"])}],
        "mode": "unmerged",
        "limits": {"max_input_tokens": 32, "max_total_tokens": 96, "max_batch_size": 4, "max_concurrent_requests": 6},
    }
    path.write_text(yaml.safe_dump(data))
    engine = boot(load_config(path))
    yield engine
    engine.close()


def _request(engine: Engine, prompt: str, n: int, **params: Any) -> PreparedRequest:
    return PreparedRequest(input_ids=engine.tokenize(prompt), params=SamplingParams(**params), max_new_tokens=n)


def _all_at_once(engine: Engine, requests: list[PreparedRequest]) -> list[Generation]:
    results: list[Generation | None] = [None] * len(requests)

    def run(i: int) -> None:
        results[i] = engine.generate(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_batched_greedy_equals_solo(engine: Engine) -> None:
    # Different prompt lengths and max_new_tokens: rows join with padding and leave at different steps.
    requests = [_request(engine, p, n) for p, n in zip(PROMPTS, [5, 17, 9, 23, 3, 12], strict=True)]
    solo = [[t.id for t in engine.generate(r).tokens] for r in requests]
    sizes: list[int] = []
    engine.scheduler.on_step = lambda _lane, batch, _queue: sizes.append(batch)
    try:
        batched = [[t.id for t in g.tokens] for g in _all_at_once(engine, requests)]
    finally:
        engine.scheduler.on_step = None
    assert batched == solo
    assert max(sizes) == 4  # the batch filled to max_batch_size, so rows really shared forward passes
    assert len({len(s) for s in solo}) > 1  # and they left at different steps


def test_seeded_sampling_does_not_depend_on_the_batch(engine: Engine) -> None:
    seeded = _request(engine, "The capital", 16, do_sample=True, temperature=1.3, seed=99)
    alone = [t.id for t in engine.generate(seeded).tokens]
    others = [_request(engine, p, 20, do_sample=True, temperature=1.3) for p in PROMPTS[:3]]
    together = _all_at_once(engine, [*others, seeded])[-1]
    assert [t.id for t in together.tokens] == alone and together.seed == 99


def test_cancel_frees_the_slot_within_a_step(engine: Engine) -> None:
    seen: list[int] = []
    done = threading.Event()

    def emit(item: Token | BaseException, gen: Generation) -> None:
        seen.append(len(gen.tokens))
        if gen.finish_reason:
            done.set()

    handle = engine.submit(_request(engine, "Once upon a time", 60), emit)
    while len(seen) < 3:
        time.sleep(0.001)
    handle.cancel()
    deadline = time.monotonic() + 10
    while engine.scheduler.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.scheduler.load == (0, 0)
    assert not done.is_set() and len(seen) < 60


def test_overload_past_max_concurrent_requests(engine: Engine) -> None:
    gate = threading.Event()
    # The first token's callback holds the scheduler thread, so no request can finish while we count.
    handles = [engine.submit(_request(engine, "Arr", 60), lambda *_: gate.wait(30)) for _ in range(6)]
    with pytest.raises(Overloaded):
        engine.submit(_request(engine, "Arr", 2), lambda *_: None)
    for h in handles:
        h.cancel()
    gate.set()
    deadline = time.monotonic() + 10
    while engine.scheduler.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.generate(_request(engine, "Arr", 2)).finish_reason is not None
