"""TGI streaming and the OpenAI routes over a tiny real engine: event shapes, agreement with /generate, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import Config
from server.engine.engine import Engine
from server.http.app import create_app
from tests.conftest import boot_tiny


@pytest.fixture(scope="module")
def tiny(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return boot_tiny(tmp_path_factory.mktemp("stream"), tiny_base, tiny_adapters["alpha"], max_new_tokens=8)


@pytest.fixture
def client(tiny: tuple[Config, Engine]) -> TestClient:
    return TestClient(create_app(tiny[1], tiny[0]))


def _events(client: TestClient, path: str, body: dict[str, Any]) -> list[Any]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        datas = [line.removeprefix("data:").strip() for line in r.iter_lines() if line.startswith("data:")]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


def test_generate_stream_matches_generate(client: TestClient) -> None:
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6, "details": True}}
    whole = client.post("/generate", json=body).json()
    events = _events(client, "/generate_stream", body)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == whole["generated_text"]
    assert last["details"]["finish_reason"] == whole["details"]["finish_reason"]
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["input_length"] > 0
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["details"]["tokens"]]
    assert set(events[0]["token"]) == {"id", "text", "logprob", "special"}


def test_stream_validation_error_is_422_before_streaming(client: TestClient) -> None:
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"top_p": 1.0}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and "not supported when streaming" in r.json()["error"]


def test_compat_route_streams(client: TestClient) -> None:
    events = _events(client, "/", {"inputs": "Arr", "parameters": {"max_new_tokens": 3}, "stream": True})
    assert events[-1]["generated_text"] is not None and len(events) <= 3


def test_models_lists_base_and_adapter_set(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-llama", "alpha"]


def test_completion_greedy_equals_generate(client: TestClient) -> None:
    whole = client.post("/generate", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 5}}).json()
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Once upon", "max_tokens": 5,
                                             "temperature": 0})  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == whole["generated_text"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert (
        usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] > 0
    )


def test_completion_stream_ends_with_done(client: TestClient) -> None:
    events = _events(client, "/v1/completions", {"model": "alpha", "prompt": "Arr", "max_tokens": 4,
                                                  "temperature": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})  # fmt: skip
    assert events[-1] == "[DONE]"
    assert "usage" in events[-2], json.dumps(events)
    assert events[-2]["usage"]["completion_tokens"] == len(events) - 2
    assert events[-3]["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_model_is_404_in_openai_shape(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The model `gpt-9` does not exist."
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_bad_request_shape(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 500})
    assert r.status_code == 400 and "must be <= 96" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_chat_uses_the_chat_template(client: TestClient, tiny: tuple[Config, Engine]) -> None:
    engine = tiny[1]
    engine.tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    messages = [{"role": "user", "content": "Where is the treasure?"}]
    try:
        chat = {"model": "tiny-llama", "messages": messages, "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/chat/completions", json=chat)
        prompt = str(engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        direct = client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 4}}).json()
        events = _events(client, "/v1/chat/completions", {**chat, "stream": True})
    finally:
        engine.tokenizer.chat_template = None
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": direct["generated_text"]}
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == direct["generated_text"]


def test_stream_metrics_record_ttft_and_itl(client: TestClient) -> None:
    _events(client, "/generate_stream", {"inputs": "Once upon", "parameters": {"max_new_tokens": 4}})
    text = client.get("/metrics").text
    assert 'mergeserve_time_to_first_token_seconds_count{adapter="alpha",mode="merged"} 1.0' in text
    assert 'mergeserve_batch_size_count{mode="merged"}' in text
    assert 'mergeserve_requests_in_flight{adapter="alpha",mode="merged"} 0.0' in text


def test_overload_is_429_in_both_shapes(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    import threading

    from server.engine.sampling import SamplingParams
    from server.engine.types import PreparedRequest

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_base), "id": "tiny-llama"},
        "adapters": [{"name": "alpha", "path": str(tiny_adapters["alpha"])}],
        "limits": {"max_input_tokens": 16, "max_total_tokens": 64, "max_concurrent_requests": 1},
    }))  # fmt: skip
    config = load_config(path)
    engine = boot(config)
    client = TestClient(create_app(engine, config))
    gate = threading.Event()
    # Occupies the only slot: its first token's callback holds the scheduler until the gate opens.
    held = engine.submit(PreparedRequest(engine.tokenize("Arr"), SamplingParams(), 30), lambda *_: gate.wait(30))
    try:
        r = client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert r.headers["x-merge-mode"] == "merged"
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Arr", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["message"] == "Model is overloaded"
    finally:
        held.cancel()
        gate.set()
    text = client.get("/metrics").text
    assert 'mergeserve_request_failures_total{adapter="alpha",error_type="overloaded",mode="merged"} 2.0' in text
    engine.close()


def test_error_after_the_first_token_arrives_in_the_stream(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.engine.batch

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("decode exploded")

    monkeypatch.setattr(server.engine.batch, "decode_rows", broken)
    events = _events(client, "/generate_stream", {"inputs": "Arr", "parameters": {"max_new_tokens": 5}})
    assert "token" in events[0]  # the prefill token still arrived
    assert events[-1] == {"error": "Request failed during generation: decode exploded", "error_type": "generation"}
    r = client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    text = client.get("/metrics").text
    assert 'mergeserve_request_failures_total{adapter="alpha",error_type="generation",mode="merged"} 2.0' in text


def test_generate_stream_says_how_long_it_queued(client: TestClient) -> None:
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 2}}
    with client.stream("POST", "/generate_stream", json=body) as r:
        r.read()
    assert r.status_code == 200 and int(r.headers["x-queue-time"]) >= 0  # ms, as TGI's /generate header
