"""The HTTP contract over a tiny real engine: TGI's shapes, validation messages, headers and per-mode metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import Config
from server.engine.engine import Engine
from server.http.app import attach_engine, create_app
from tests.conftest import MISS_PHASES


@pytest.fixture(scope="module")
def tiny(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("app") / "config.yaml"
    data = {
        "model": {"path": str(tiny_base), "id": "tiny-llama", "dtype": "float32"},
        "adapters": [{"name": "alpha", "path": str(tiny_adapters["alpha"]), "weight": 0.8}],
        "limits": {"max_input_tokens": 64, "max_total_tokens": 96, "max_new_tokens": 8, "max_stop_sequences": 2},
    }
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    return config, boot(config)


@pytest.fixture
def client(tiny: tuple[Config, Engine]) -> TestClient:
    config, engine = tiny
    return TestClient(create_app(engine, config))


def _samples(client: TestClient, name: str) -> list[Any]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return [s for f in families for s in f.samples if s.name == name]


def test_health_is_503_until_an_engine_is_attached(tiny: tuple[Config, Engine]) -> None:
    config, engine = tiny
    app = create_app(None, config)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"error": "loading", "error_type": "healthcheck"}
        assert c.post("/generate", json={"inputs": "hi"}).status_code == 503
        attach_engine(app, engine)
        r = c.get("/health")
        assert r.status_code == 200 and r.content == b""


def test_generate_greedy_matches_engine(client: TestClient, tiny: tuple[Config, Engine]) -> None:
    r = client.post(
        "/generate", json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5, "details": True}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(details["tokens"]) <= 5
    assert "seed" not in details  # greedy: no seed, as TGI
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in details["tokens"])
    engine = tiny[1]
    assert body["generated_text"] == engine.decode([t["id"] for t in details["tokens"]])
    for header in ("x-inference-time", "x-time-per-token", "x-queue-time", "x-total-time", "x-validation-time"):
        assert int(r.headers[header]) >= 0
    assert r.headers["x-merge-mode"] == "merged"
    assert int(r.headers["x-generated-tokens"]) == details["generated_tokens"]
    assert int(r.headers["x-prompt-tokens"]) == len(engine.tokenize("Once upon a time"))


def test_no_details_unless_asked_and_full_text(client: TestClient) -> None:
    body = client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 3}}).json()
    assert set(body) == {"generated_text"}
    full = client.post(
        "/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    ).json()
    assert full["generated_text"] == "Arr" + body["generated_text"]


def test_seeded_sampling_is_reproducible_and_reports_seed(client: TestClient) -> None:
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 1234, "details": True}
    a = client.post("/generate", json={"inputs": "The capital", "parameters": params}).json()
    b = client.post("/generate", json={"inputs": "The capital", "parameters": params}).json()
    assert a["details"]["seed"] == b["details"]["seed"] == 1234
    # Same tokens; their logprobs equal up to float rounding, since the repeat reuses the first prompt's cached K/V
    # (server.engine.prefix_cache) and computes only its last position, in a forward of another shape.
    assert a["generated_text"] == b["generated_text"]
    tokens_a, tokens_b = a["details"].pop("tokens"), b["details"].pop("tokens")
    assert a["details"] == b["details"]
    assert [(t["id"], t["text"]) for t in tokens_a] == [(t["id"], t["text"]) for t in tokens_b]
    assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(tokens_a, tokens_b, strict=True)) < 1e-4
    outputs = {
        client.post("/generate", json={"inputs": "The capital", "parameters": {**params, "seed": s}}).json()[
            "generated_text"
        ]
        for s in range(6)
    }
    assert len(outputs) > 1  # six seeds at temperature 1.5 over a 400-token vocabulary do not all agree


def test_omitted_parameters_means_sampling_with_a_random_seed(client: TestClient) -> None:
    r = client.post("/generate", json={"inputs": "The capital"})
    assert r.status_code == 200
    # details were not asked for, so the seed is not shown; the generation still respected the default limit
    assert int(r.headers["x-generated-tokens"]) <= 8


def test_stop_sequence(client: TestClient, tiny: tuple[Config, Engine]) -> None:
    free = client.post("/generate", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 8}}).json()
    text = free["generated_text"]
    stop = text[len(text) // 2 :][:2] or text
    r = client.post(
        "/generate", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 8, "stop": [stop], "details": True}}
    ).json()
    assert r["details"]["finish_reason"] == "stop_sequence"
    assert stop in r["generated_text"] and text.startswith(r["generated_text"])


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"stop": ["a", "b", "c"]}, "`stop` supports up to 2 stop sequences. Given: 3"),
        ({"max_new_tokens": 95}, "`inputs` tokens + `max_new_tokens` must be <= 96. Given: "),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 64. Given: 0"),
        ({"best_of": 2}, "`best_of` != 1 is not allowed for this endpoint"),
        ({"adapter_id": "someone-else"}, "`adapter_id` 'someone-else' is not served"),
        ({"watermark": True}, "`watermark` is not supported"),
    ],
)
def test_tgi_validation_messages(client: TestClient, parameters: dict[str, Any], message: str) -> None:
    r = client.post("/generate", json={"inputs": "Hello there", "parameters": parameters})
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "validation"
    assert body["error"].startswith("Input validation error: ")
    assert message in body["error"]


def test_served_adapter_id_is_accepted(client: TestClient) -> None:
    r = client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "alpha", "max_new_tokens": 2}})
    assert r.status_code == 200


def test_input_limits(client: TestClient) -> None:
    long_input = "pirate treasure " * 80
    r = client.post("/generate", json={"inputs": long_input, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and "`inputs` must have less than 64 tokens" in r.json()["error"]
    r = client.post("/generate", json={"inputs": long_input, "parameters": {"max_new_tokens": 2, "truncate": 10}})
    assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "10"
    r = client.post("/generate", json={"inputs": ""})
    assert r.status_code == 422 and "`inputs` cannot be empty" in r.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"parameters": {}},
        {"inputs": 3},
        {"inputs": "x", "parameters": {"temperature": "hot"}},
        {"inputs": "x", "parameters": {"max_new_token": 3}},
    ],
)
def test_malformed_bodies_get_tgi_error_shape(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 422
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "validation"


def test_compat_route_returns_a_list(client: TestClient) -> None:
    r = client.post("/", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]


def test_info(client: TestClient) -> None:
    info = client.get("/info").json()
    for key in ("model_id", "model_sha", "max_concurrent_requests", "max_best_of", "max_stop_sequences",
                "max_input_tokens", "max_total_tokens", "validation_workers", "max_client_batch_size", "router",
                "version", "sha", "docker_label"):  # fmt: skip
        assert key in info
    assert info["model_id"] == "tiny-llama" and info["max_total_tokens"] == 96 and info["mode"] == "merged"
    (adapter,) = info["adapters"]
    assert adapter["name"] == "alpha" and adapter["rank"] == 4 and adapter["alpha"] == 8 and adapter["weight"] == 0.8
    assert set(adapter["target_modules"]) >= {"q_proj", "down_proj"}
    assert info["dtype"] == "float32" and info["device_map"]["cpu"] > 0
    assert set(info["boot_seconds"]) == {*MISS_PHASES}
    assert info["cache"]["status"] == "miss" and info["cache"]["hit"] is False and len(info["cache"]["key"]) == 32
    assert info["parity"]["passed"] is True and info["parity"]["max_abs_diff"] <= info["parity"]["tolerance"]


def test_metrics_are_labelled_by_mode(client: TestClient) -> None:
    client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}})
    client.post("/generate", json={"inputs": "Arr", "parameters": {"temperature": -1}})
    counts = _samples(client, "mergeserve_request_duration_seconds_count")
    assert [(s.labels, s.value) for s in counts] == [({"mode": "merged", "adapter": "alpha"}, 1.0)]
    failures = _samples(client, "mergeserve_request_failures_total")
    assert [(s.labels, s.value) for s in failures] == [
        ({"mode": "merged", "adapter": "alpha", "error_type": "validation"}, 1.0)
    ]
    histograms = ["inference_duration_seconds", "time_per_output_token_seconds", "prompt_tokens", "generated_tokens",
                  "queue_duration_seconds"]  # fmt: skip
    for name in (f"mergeserve_request_{h}_count" for h in histograms):
        assert [s.labels["mode"] for s in _samples(client, name)] == ["merged"], name
    assert {s.labels["phase"] for s in _samples(client, "mergeserve_boot_phase_duration_seconds")} == {*MISS_PHASES}
    peaks = _samples(client, "mergeserve_boot_phase_peak_rss_bytes")
    assert {s.labels["phase"]: s.value for s in peaks} == client.get("/info").json()["boot_peak_rss_bytes"]
    assert {s.labels["phase"] for s in peaks} == {*MISS_PHASES} and all(s.value > 0 for s in peaks)
    assert [s.value for s in _samples(client, "mergeserve_merge_cache_hit")] == [0.0]
    (diff,) = _samples(client, "mergeserve_parity_max_abs_logit_diff")
    assert diff.labels == {"mode": "merged"} and 0 <= diff.value < 1e-3
    (info,) = _samples(client, "mergeserve_model_info")
    assert info.labels["adapters"] == "alpha:0.8" and info.labels["dtype"] == "float32"
    assert info.labels["device"] == "cpu"
    (in_flight,) = _samples(client, "mergeserve_requests_in_flight")
    assert in_flight.value == 0


def test_two_apps_in_one_process_have_separate_registries(tiny: tuple[Config, Engine]) -> None:
    config, engine = tiny
    a, b = TestClient(create_app(engine, config)), TestClient(create_app(engine, config))
    a.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}})
    assert len(_samples(a, "mergeserve_request_duration_seconds_count")) == 1
    assert _samples(b, "mergeserve_request_duration_seconds_count") == []


def test_info_and_metrics_report_the_kv_budget(client: TestClient, tiny_base: Path) -> None:
    """The budget in bytes, worked out here from config.json: layers x 2 x KV heads x head dim x 4 (float32), for
    the default max_batch_size 8 x the fixture's max_total_tokens 96, and the default 2048-token prefix cache."""
    cfg = json.loads((tiny_base / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4
    engine = client.get("/info").json()["engine"]
    kv, prefix = engine["kv_cache"], engine["prefix_cache"]
    assert (kv["tokens_per_arm"], kv["bytes_per_token"], kv["dtype"]) == (8 * 96, per_token, "float32")
    assert kv["bytes"] == kv["bytes_per_arm"] == 8 * 96 * per_token and "limits.max_batch_size 8" in kv["derived_from"]
    assert (prefix["tokens_per_arm"], prefix["bytes"]) == (2048, 2048 * per_token) and engine["arms"] == ["merged"]
    gauges = {name: _samples(client, f"mergeserve_{name}") for name in ("kv_cache_bytes", "kv_cache_tokens",
                                                                         "prefix_cache_bytes")}  # fmt: skip
    assert {name: [(s.labels, s.value) for s in found] for name, found in gauges.items()} == {
        "kv_cache_bytes": [({"mode": "merged"}, 8 * 96 * per_token)],
        "kv_cache_tokens": [({"mode": "merged"}, 8 * 96)],
        "prefix_cache_bytes": [({"mode": "merged"}, 2048 * per_token)],
    }
