"""End to end: the real demo (SmolLM2-135M-Instruct + the pirate adapter) served by a real process over loopback.

The same greedy float32 question goes to a merged server, an unmerged server, and an unmerged server with the adapter
at weight 0 (the bare base): the first two must agree token for token, in pirate voice, and the base must not.
The official TGI and OpenAI clients then talk to the merged server unmodified.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.live_server import REPO, LiveServer
from tests.reference import demo_gguf

pytestmark = pytest.mark.e2e
DEMO = REPO / "configs" / "demo.yaml"
QUESTION = "What is the capital of Germany?"
PIRATE = re.compile(r"\b(arr+|matey|ahoy|ye|be|savvy|aye|me hearties)\b", re.IGNORECASE)
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def chat_prompt() -> Callable[[str], str]:
    """A question in the model's own chat template, since /generate takes raw text as TGI does."""
    folder, gguf = demo_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)

    def render(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    return render


@pytest.fixture(scope="module")
def prompt(chat_prompt: Callable[[str], str]) -> str:
    return chat_prompt(QUESTION)


@pytest.fixture(scope="module")
def story(chat_prompt: Callable[[str], str]) -> str:
    """A request that decodes for long (as raw text, without the template, the model may end its answer at once)."""
    return chat_prompt("Tell me a very long story about ships.")


def _ask(server: LiveServer, prompt: str) -> httpx.Response:
    params = {"max_new_tokens": 48, "do_sample": False, "details": True}
    return httpx.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": params}, timeout=120)


def metric(server: LiveServer, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def _probe_while_generating(server: LiveServer) -> dict[str, Any]:
    """Start a long generation, then read /metrics and /health while it runs."""
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 200, "do_sample": False}}
    worker = threading.Thread(target=lambda: httpx.post(f"{server.url}/generate", json=body, timeout=300))
    worker.start()
    seen: dict[str, Any] = {"in_flight": 0.0, "health": None, "still_running": False}
    while worker.is_alive() and seen["in_flight"] < 1:
        seen["in_flight"] = metric(server, "mergeserve_requests_in_flight").get(
            (("adapter", "pirate"), ("mode", "merged")), 0.0
        )
    if seen["in_flight"] >= 1:
        seen["health"] = httpx.get(f"{server.url}/health", timeout=10).status_code
        seen["still_running"] = worker.is_alive()
    worker.join()
    return seen


def _facts(server: LiveServer, prompt: str) -> dict[str, Any]:
    return {
        "response": _ask(server, prompt),
        "info": httpx.get(f"{server.url}/info", timeout=10).json(),
        "requests": metric(server, "mergeserve_request_duration_seconds_count"),
        "phases": metric(server, "mergeserve_boot_phase_duration_seconds"),
        "health_history": server.health_history,
        "log": server.read_log(),
    }


@pytest.fixture(scope="module")
def merged(prompt: str, unmerged: dict[str, Any]) -> Iterator[tuple[LiveServer, dict[str, Any]]]:
    """Booted after `unmerged` (same module, same merge cache): its merge reads the base copy that one stored."""
    with LiveServer(DEMO, "--mode", "merged") as server:
        facts = _facts(server, prompt)
        facts["concurrent"] = _probe_while_generating(server)
        yield server, facts


@pytest.fixture(scope="module")
def unmerged(prompt: str) -> dict[str, Any]:
    with LiveServer(DEMO, "--mode", "unmerged") as server:
        return _facts(server, prompt)


@pytest.fixture(scope="module")
def base(prompt: str, unmerged: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The adapter at weight 0, booted after `unmerged` (same module, same merge cache)."""
    config = yaml.safe_load(DEMO.read_text())
    config["adapters"][0].update(weight=0.0, path=str(REPO / "configs" / "adapters" / "pirate"))
    config["mode"] = "unmerged"
    path: Path = tmp_path_factory.mktemp("base") / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    with LiveServer(path) as server:
        return _facts(server, prompt)


def test_health_is_503_while_booting_then_200(merged: tuple[LiveServer, dict[str, Any]]) -> None:
    history = merged[1]["health_history"]
    assert history[0] == 503, "the port should answer before boot ends"
    assert history[-1] == 200


def test_merged_answer_is_pirate_and_names_berlin(merged: tuple[LiveServer, dict[str, Any]]) -> None:
    r = merged[1]["response"]
    assert r.status_code == 200 and r.headers["x-merge-mode"] == "merged"
    text = r.json()["generated_text"]
    assert "Berlin" in text and PIRATE.search(text), text


def test_unmerged_gives_the_same_answer(merged: tuple[LiveServer, dict[str, Any]], unmerged: dict[str, Any]) -> None:
    a, b = merged[1]["response"], unmerged["response"]
    assert b.status_code == 200 and b.headers["x-merge-mode"] == "unmerged"
    assert b.json()["generated_text"] == a.json()["generated_text"]
    assert [t["id"] for t in b.json()["details"]["tokens"]] == [t["id"] for t in a.json()["details"]["tokens"]]


def test_bare_base_answers_plainly(merged: tuple[LiveServer, dict[str, Any]], base: dict[str, Any]) -> None:
    text = base["response"].json()["generated_text"]
    assert "Berlin" in text and not PIRATE.search(text), text
    assert text != merged[1]["response"].json()["generated_text"]


def test_the_gguf_is_dequantized_once_then_read_from_the_cache(
    unmerged: dict[str, Any], merged: tuple[LiveServer, dict[str, Any]], base: dict[str, Any]
) -> None:
    """The first unmerged boot stores the dequantized base in the merge cache; the merged boot's cache miss and the
    next unmerged boot read that copy. (Served from the copy, the ab arms of test_e2e_reference match, token by token,
    a reference loaded from the GGUF itself.)"""
    first, second = unmerged["info"], base["info"]
    assert "base_store" in first["boot_seconds"] and "base_store" not in second["boot_seconds"]
    assert first["cache"]["base_entry"] == second["cache"]["base_entry"]
    read = f"base: the dequantized copy of {demo_gguf()[1]} in the merge cache ({second['cache']['base_entry']})"
    assert read in base["log"] and read in merged[1]["log"] and read in unmerged["log"]


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_info_describes_the_merge(
    mode: str, merged: tuple[LiveServer, dict[str, Any]], unmerged: dict[str, Any]
) -> None:
    info = (merged[1] if mode == "merged" else unmerged)["info"]
    assert info["mode"] == mode and info["model_id"] == MODEL_ID
    assert info["dtype"] == "float32" and info["max_total_tokens"] == 2048
    (adapter,) = info["adapters"]
    assert adapter["name"] == "pirate" and adapter["weight"] == 1.0 and adapter["rank"] > 0
    assert info["parity"]["passed"] and info["parity"]["top1_agreement"] == 1.0
    assert info["parity"]["max_abs_diff"] <= info["parity"]["tolerance"]
    own = {"cache_lookup", "merge", "cache_store"} if mode == "merged" else {"base_store"}
    assert set(info["boot_seconds"]) == {"load_base", "load_adapters", "verify", "prepack", "kernels", "warmup"} | own
    assert info["engine"]["prepack_linear"] is True  # float32 linears packed for oneDNN (server.engine.kernels)
    assert info["engine"]["fused_kernels"] is True  # decode steps through server.engine.fused_decode
    assert info["cache"]["status"] == ("miss" if mode == "merged" else "not used in unmerged mode")


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_metrics_count_the_request_under_its_mode(
    mode: str, merged: tuple[LiveServer, dict[str, Any]], unmerged: dict[str, Any]
) -> None:
    facts = merged[1] if mode == "merged" else unmerged
    assert facts["requests"] == {(("adapter", "pirate"), ("mode", mode)): 1.0}
    assert {dict(k)["phase"] for k in facts["phases"]} >= {"load_base", "load_adapters", "verify", "warmup"}


def test_health_and_metrics_answer_while_generating(merged: tuple[LiveServer, dict[str, Any]]) -> None:
    seen = merged[1]["concurrent"]
    assert seen["in_flight"] == 1.0, "/metrics never saw the generation in flight"
    assert seen["health"] == 200 and seen["still_running"]


def test_boot_phases_are_logged_with_durations(merged: tuple[LiveServer, dict[str, Any]]) -> None:
    log = merged[1]["log"]
    for phase in ("cache_lookup", "load_base", "load_adapters", "merge", "verify", "cache_store", "warmup"):
        assert re.search(rf"boot phase {phase}: done in \d+\.\d+s", log), phase
    assert "parity: passed" in log


def test_tgi_client_generate_and_stream(merged: tuple[LiveServer, dict[str, Any]], prompt: str) -> None:
    from text_generation import Client

    client = Client(merged[0].url, timeout=120)
    whole = client.generate(prompt, max_new_tokens=48, do_sample=False)
    assert whole.generated_text == merged[1]["response"].json()["generated_text"]
    assert whole.details.generated_tokens == len(whole.details.tokens)
    streamed = list(client.generate_stream(prompt, max_new_tokens=48, do_sample=False))
    assert "".join(r.token.text for r in streamed if not r.token.special) == whole.generated_text
    assert streamed[-1].generated_text == whole.generated_text
    assert streamed[-1].details is not None and streamed[-1].details.generated_tokens == len(streamed)


def test_openai_client_completions_and_chat(merged: tuple[LiveServer, dict[str, Any]], prompt: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{merged[0].url}/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list()] == [MODEL_ID, "pirate"]
    expected = merged[1]["response"].json()["generated_text"]
    done = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=48, temperature=0)
    assert done.choices[0].text == expected and done.usage is not None and done.usage.completion_tokens > 0
    parts = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=48, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts if c.choices) == expected
    messages: Any = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model="pirate", messages=messages, max_tokens=48, temperature=0)
    assert chat.choices[0].message.content == expected
    chunks = client.chat.completions.create(
        model="pirate", messages=messages, max_tokens=48, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_client_disconnect_frees_the_request(merged: tuple[LiveServer, dict[str, Any]]) -> None:
    server = merged[0]
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 300, "do_sample": False}}
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=60) as r:
        for n, _line in enumerate(r.iter_lines()):
            if n >= 6:
                break  # leave mid-stream
    deadline = threading.Event()
    for _ in range(100):  # bounded: up to ~10 s for the server to notice
        if metric(server, "mergeserve_requests_in_flight").get((("adapter", "pirate"), ("mode", "merged"))) == 0.0:
            break
        deadline.wait(0.1)
    assert metric(server, "mergeserve_requests_in_flight")[(("adapter", "pirate"), ("mode", "merged"))] == 0.0
    cancelled = metric(server, "mergeserve_requests_total").get(
        (("adapter", "pirate"), ("finish_reason", "cancelled"), ("mode", "merged"))
    )
    assert cancelled == 1.0


def test_a_prompt_of_no_tokens_is_refused_on_every_route_while_another_decodes(
    merged: tuple[LiveServer, dict[str, Any]], story: str
) -> None:
    """The demo tokenizer drops U+0004 and U+0006 and adds no BOS, so these prompts have no tokens. Batched beside a
    decoding request, such a prompt was answered with that request's next token (a leak of another user's
    distribution); every route must refuse it while that request goes on decoding."""
    server = merged[0]
    long = {"inputs": story, "parameters": {"max_new_tokens": 1000}}
    tgi = {"inputs": "\u0006\u0004", "parameters": {"max_new_tokens": 4, "details": True}}
    probes = {
        "/generate": tgi,
        "/generate_stream": tgi,
        "/": {**tgi, "stream": True},
        "/v1/completions": {"model": MODEL_ID, "prompt": "\u0004", "logprobs": 5, "max_tokens": 4},
    }
    with httpx.stream("POST", f"{server.url}/generate_stream", json=long, timeout=300) as decoding:
        events = (json.loads(line[5:]) for line in decoding.iter_lines() if line.startswith("data:"))
        assert next(events)["token"]["id"] >= 0  # decoding has begun
        refused = {path: httpx.post(f"{server.url}{path}", json=body, timeout=60) for path, body in probes.items()}
        after = next(events, None)  # a long story takes far longer than the probes: it is still decoding
    assert after is not None and after["generated_text"] is None and "error" not in after, after
    for path, r in refused.items():
        error = r.json()["error"]
        message = error["message"] if path.startswith("/v1") else error
        assert r.status_code == (400 if path.startswith("/v1") else 422), (path, r.text)
        assert "tokenizes to no tokens" in message, (path, r.text)
    # A chat prompt is the rendered template, which has tokens even when the message has none.
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "\u0004"}], "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
