"""Every served token against an independent reference: one plain forward of PEFT's own merge, no cache, no mask.

The reference model is built here from the files on disk (transformers + PEFT `merge_and_unload`), never by
mergeserve's merge, and is run as one `model(input_ids)` over prompt + generated ids. A served token's logprob must
equal the reference's log-softmax at its position within 1e-4 (float32), and greedy must pick the argmax. Comparing
batched with solo output of the same loop, or the merged arm with the unmerged one, cannot catch a decode bug that
both share (an off-by-one mask once shifted every position and all such tests passed).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, PreTrainedModel

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import Config
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import Generation, PreparedRequest
from server.http.app import create_app
from tests.reference import assert_served_like_reference, peft_merged, reference_greedy, reference_logprobs

TOL = 1e-4
PROMPTS = [
    "Once upon a time",
    "The capital of France is Paris. The capital of",
    "Arr",
    "def fibonacci(n): return n if n < 2 else",
    "Arr matey, hoist the sails and find the treasure! Once upon a time there was a small model",
    "pirate",
    "Paris Paris Paris",
    "The capital of France is",
]
MAX_NEW = [9, 17, 5, 23, 12, 3, 20, 14]


@pytest.fixture(scope="module")
def ab(peaky: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An A/B engine (both arms) with a batch of 4, so 8 requests queue, join and leave at different steps."""
    base, adapter = peaky
    path = tmp_path_factory.mktemp("served") / "config.yaml"
    data = {
        "model": {"path": str(base), "id": "tiny-llama", "dtype": "float32"},
        "adapters": [{"name": "alpha", "path": str(adapter)}],
        "mode": "ab",
        "limits": {
            "max_input_tokens": 64,
            "max_total_tokens": 128,
            "max_new_tokens": 32,
            "max_batch_size": 4,
            "max_concurrent_requests": 16,
        },
    }
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    engine = boot(config)
    yield config, engine
    engine.close()


@pytest.fixture(scope="module")
def reference(peaky: tuple[Path, Path]) -> PreTrainedModel:
    return peft_merged(AutoModelForCausalLM.from_pretrained(peaky[0], dtype=torch.float32), peaky[1])


def _request(engine: Engine, prompt: str, n: int) -> PreparedRequest:
    return PreparedRequest(input_ids=engine.tokenize(prompt), params=SamplingParams(), max_new_tokens=n)


def _check(reference: PreTrainedModel, prompt_ids: list[int], gen: Generation) -> None:
    tokens = [(t.id, t.logprob) for t in gen.tokens]
    assert_served_like_reference(reference, prompt_ids, tokens, tol=TOL)


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_one_request_alone(ab: tuple[Config, Engine], reference: PreTrainedModel, arm: str) -> None:
    engine = ab[1]
    for prompt, n in zip(PROMPTS[:3], MAX_NEW[:3], strict=True):
        request = _request(engine, prompt, n)
        _check(reference, request.input_ids, engine.generate(request, arm))


def _batched(engine: Engine, requests: list[PreparedRequest], arm: str) -> list[Generation]:
    """Submit all requests while the first one's first token holds the model thread, so the rest queue up.

    With a batch of 4 they then join a running batch: three at once behind the first, the others one by one as
    rows with fewer tokens leave.
    """
    gate, finished = threading.Event(), threading.Semaphore(0)
    results: list[Generation | BaseException | None] = [None] * len(requests)

    def emitter(i: int) -> Callable[[Any, Generation], None]:
        def emit(item: Any, gen: Generation) -> None:
            if i == 0:
                gate.wait(30)
            if isinstance(item, BaseException) or gen.finish_reason is not None:
                results[i] = item if isinstance(item, BaseException) else gen
                finished.release()

        return emit

    for i, request in enumerate(requests):
        engine.submit(request, emitter(i), arm)
    gate.set()
    for _ in requests:
        assert finished.acquire(timeout=60)
    assert all(isinstance(r, Generation) for r in results), results
    return [r for r in results if isinstance(r, Generation)]


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_eight_requests_joining_and_leaving(ab: tuple[Config, Engine], reference: PreTrainedModel, arm: str) -> None:
    engine = ab[1]
    requests = [_request(engine, p, n) for p, n in zip(PROMPTS, MAX_NEW, strict=True)]
    sizes: list[int] = []
    engine.scheduler.on_step = lambda _lane, batch, _queue: sizes.append(batch)
    try:
        gens = _batched(engine, requests, arm)
    finally:
        engine.scheduler.on_step = None
    assert len(gens) == 8
    for request, gen in zip(requests, gens, strict=True):
        _check(reference, request.input_ids, gen)
    # Rows really shared forward passes, and the batch shrank (rows were trimmed) while others still ran.
    assert max(sizes) == 4
    assert any(later < earlier for earlier, later in itertools.pairwise(sizes))


def test_sampled_tokens_carry_the_tempered_logprob(ab: tuple[Config, Engine], reference: PreTrainedModel) -> None:
    engine = ab[1]
    requests = [
        PreparedRequest(engine.tokenize(p), SamplingParams(do_sample=True, temperature=0.7, seed=i), n)
        for i, (p, n) in enumerate(zip(PROMPTS, MAX_NEW, strict=True))
    ]
    for request, gen in zip(requests, _batched(engine, requests, "merged"), strict=True):
        tokens = [(t.id, t.logprob) for t in gen.tokens]
        assert_served_like_reference(reference, request.input_ids, tokens, tol=TOL, temperature=0.7)


def _events(client: TestClient, path: str, body: dict[str, Any], headers: dict[str, str]) -> list[Any]:
    with client.stream("POST", path, json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        datas = [line.removeprefix("data:").strip() for line in r.iter_lines() if line.startswith("data:")]
    return [json.loads(d) for d in datas if d != "[DONE]"]


RouteCheck = Callable[[TestClient, dict[str, str], PreTrainedModel, Engine], None]


def _tgi_generate(client: TestClient, headers: dict[str, str], reference: PreTrainedModel, engine: Engine) -> None:
    prompt = PROMPTS[1]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}}
    r = client.post("/generate", json=body, headers=headers)
    assert r.status_code == 200, r.text
    tokens = [(t["id"], t["logprob"]) for t in r.json()["details"]["tokens"]]
    assert_served_like_reference(reference, engine.tokenize(prompt), tokens, tol=TOL)


def _tgi_stream(client: TestClient, headers: dict[str, str], reference: PreTrainedModel, engine: Engine) -> None:
    prompt = PROMPTS[3]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 12}}
    tokens = [(e["token"]["id"], e["token"]["logprob"]) for e in _events(client, "/generate_stream", body, headers)]
    assert_served_like_reference(reference, engine.tokenize(prompt), tokens, tol=TOL)


def _openai_completion(client: TestClient, headers: dict[str, str], reference: PreTrainedModel, engine: Engine) -> None:
    prompt = PROMPTS[4]
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 10, "temperature": 0}
    r = client.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    ids = reference_greedy(reference, engine.tokenize(prompt), 10, engine.eos_ids)
    assert r.json()["choices"][0]["text"] == engine.decode(ids)
    streamed = _events(client, "/v1/completions", {**body, "stream": True}, headers)
    assert "".join(e["choices"][0]["text"] for e in streamed if e["choices"]) == engine.decode(ids)


def _chat_prompt_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """What the chat route feeds the model: the template rendered to text, tokenized without adding specials again."""
    rendered = str(engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return list(engine.tokenizer(rendered, add_special_tokens=False).input_ids)


def _openai_chat(client: TestClient, headers: dict[str, str], reference: PreTrainedModel, engine: Engine) -> None:
    messages = [{"role": "user", "content": PROMPTS[0]}]
    body = {"model": "tiny-llama", "messages": messages, "max_tokens": 10, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    prompt_ids = _chat_prompt_ids(engine, messages)
    ids = reference_greedy(reference, prompt_ids, 10, engine.eos_ids)
    assert r.json()["choices"][0]["message"]["content"] == engine.decode(ids)
    assert r.json()["usage"]["prompt_tokens"] == len(prompt_ids)


ROUTES: dict[str, RouteCheck] = {
    "generate": _tgi_generate,
    "generate_stream": _tgi_stream,
    "v1_completions": _openai_completion,
    "v1_chat": _openai_chat,
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_every_route_serves_the_reference(
    ab: tuple[Config, Engine], reference: PreTrainedModel, route: str, arm: str
) -> None:
    config, engine = ab
    client = TestClient(create_app(engine, config))
    ROUTES[route](client, {"x-merge-mode": arm}, reference, engine)


# Log-probabilities on the OpenAI routes: (token texts, logprobs, top alternatives as text -> logprob) per route.
Served = tuple[list[str], list[float], list[dict[str, float]]]
K = 3


def _completion_logprobs(client: TestClient, headers: dict[str, str], prompt: str, stream: bool) -> Served:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": K}
    if stream:
        parts = [e["choices"][0]["logprobs"] for e in _events(client, "/v1/completions", {**body, "stream": True},
                                                               headers) if e["choices"]]  # fmt: skip
        text = "".join(e for part in parts for e in part["tokens"])  # not the text: only used for offsets below
    else:
        r = client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        parts, text = [r.json()["choices"][0]["logprobs"]], r.json()["choices"][0]["text"]
    tokens = [t for p in parts for t in p["tokens"]]
    offsets = [o for p in parts for o in p["text_offset"]]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    if not stream:  # each plain token's text starts where its offset says, in the returned text
        # A token holding part of a character (decoded alone: U+FFFD) comes out with the next token's text.
        whole = [t for prev, t in zip(["", *tokens], tokens, strict=False) if "\ufffd" not in prev + t]
        placed = [text[o:].startswith(t) for prev, o, t in zip(["", *tokens], offsets, tokens, strict=False)
                  if "\ufffd" not in prev + t and t != "</s>"]  # fmt: skip
        assert all(placed) and len(whole) > len(tokens) // 2, (text, tokens, offsets)
    return tokens, [lp for p in parts for lp in p["token_logprobs"]], [d for p in parts for d in p["top_logprobs"]]


def _chat_logprobs(client: TestClient, headers: dict[str, str], prompt: str, stream: bool) -> Served:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": prompt}], "max_tokens": 10,
            "temperature": 0, "logprobs": True, "top_logprobs": K}  # fmt: skip
    if stream:
        events = _events(client, "/v1/chat/completions", {**body, "stream": True}, headers)
        content = [c for e in events if e["choices"] and e["choices"][0]["logprobs"]
                   for c in e["choices"][0]["logprobs"]["content"]]  # fmt: skip
    else:
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
    for c in content:
        assert c["bytes"] == list(c["token"].encode()) and all(a["bytes"] == list(a["token"].encode())
                                                               for a in c["top_logprobs"])  # fmt: skip
    tops = [{a["token"]: a["logprob"] for a in c["top_logprobs"]} for c in content]
    return [c["token"] for c in content], [c["logprob"] for c in content], tops


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_openai_routes_serve_reference_logprobs(
    ab: tuple[Config, Engine], reference: PreTrainedModel, route: str, arm: str, stream: bool
) -> None:
    """Each returned token's logprob and its K best alternatives equal the plain forward's log-softmax."""
    config, engine = ab
    client, headers, prompt = TestClient(create_app(engine, config)), {"x-merge-mode": arm}, PROMPTS[4]
    if route == "completions":
        texts, logprobs, tops = _completion_logprobs(client, headers, prompt, stream)
        prompt_ids = engine.tokenize(prompt)
    else:
        texts, logprobs, tops = _chat_logprobs(client, headers, prompt, stream)
        prompt_ids = _chat_prompt_ids(engine, [{"role": "user", "content": prompt}])
    ids = reference_greedy(reference, prompt_ids, 10, engine.eos_ids)
    # Tokenizing the texts back is ambiguous; the reference's own ids must decode to them one by one.
    assert texts == [engine.decode([i], skip_special_tokens=False) for i in ids]
    assert_served_like_reference(reference, prompt_ids, list(zip(ids, logprobs, strict=True)), tol=TOL)
    expected = reference_logprobs(reference, prompt_ids, ids).topk(K, dim=-1)
    for step, (text, top) in enumerate(zip(texts, tops, strict=True)):
        assert list(top.values()) == sorted(top.values(), reverse=True) and text in top, (step, text, top)
        want = {engine.decode([int(i)], skip_special_tokens=False): float(v)
                for v, i in zip(expected.values[step], expected.indices[step], strict=True)}  # fmt: skip
        assert top.keys() == want.keys(), (step, top, want)
        assert all(abs(top[t] - want[t]) <= TOL for t in want), (step, top, want)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": 1, "echo": True}, "echo"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ],
)
def test_openai_logprobs_out_of_range_is_400(
    ab: tuple[Config, Engine], path: str, extra: dict[str, Any], param: str
) -> None:
    config, engine = ab
    prompt = {"prompt": "Arr"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Arr"}]}
    r = TestClient(create_app(engine, config)).post(path, json={"model": "tiny-llama", **prompt, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "BadRequestError" and r.json()["error"]["param"] == param, r.text


def test_alternatives_outside_top_p_are_left_out(ab: tuple[Config, Engine]) -> None:
    """top_p keeps few tokens; the rest have logprob -inf, which JSON cannot carry, and no sample can pick them."""
    config, engine = ab
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Arr"}], "max_tokens": 6, "top_p": 0.05,
            "seed": 3, "logprobs": True, "top_logprobs": 5}  # fmt: skip
    r = TestClient(create_app(engine, config)).post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(1 <= len(c["top_logprobs"]) < 5 for c in content), content
    assert all(a["logprob"] > float("-inf") for c in content for a in c["top_logprobs"])
