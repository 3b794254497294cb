"""End to end on vLLM: `configs/demo-vllm.yaml` (both arms on vLLM in one process) behind a real uvicorn process.

Every served token is checked against a plain float32 forward of PEFT's own merge of the demo (tests/reference.py),
on both arms, through TGI's routes and OpenAI's with real clients (httpx, TGI's `text_generation`, `openai`). The
tolerance is vLLM's: its CPU kernels sum in another order than transformers (3e-5 measured on this model).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from text_generation import Client
from transformers import PreTrainedTokenizerBase

from tests.live_server import LiveServer
from tests.reference import assert_served_like_reference

pytestmark = pytest.mark.e2e
QUESTIONS = ["Where is the treasure buried?", "Hi", "Name three colours.", "What is the capital of Germany?"]
MAX_NEW = 32
TOL = 1e-3


@pytest.fixture(scope="module")
def server(vllm_ab_server: LiveServer) -> LiveServer:
    return vllm_ab_server  # shared with test_vllm_conformance (tests/e2e/conftest.py); this module runs first


def _chat(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    return str(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True))  # fmt: skip


def _generate(server: LiveServer, prompt: str, arm: str, **parameters: Any) -> httpx.Response:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True, **parameters}}
    return httpx.post(f"{server.url}/generate", json=body, headers={"x-merge-mode": arm}, timeout=600)


def test_info_names_the_engine_and_its_gate(server: LiveServer) -> None:
    info = httpx.get(f"{server.url}/info").json()
    assert info["engine"]["kind"] == "vllm" and info["mode"] == "ab"
    assert {g["arm"]: g["passed"] for g in info["engine"]["gate"]} == {"merged": True, "unmerged": True}


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_generate_in_a_batch_matches_the_reference(server: LiveServer, pirate_reference: Any, arm: str) -> None:
    model, tokenizer = pirate_reference
    prompts = [_chat(tokenizer, q) for q in QUESTIONS]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: _generate(server, p, arm), prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer.status_code == 200 and answer.headers["x-merge-mode"] == arm, answer.text
        tokens = [(t["id"], t["logprob"]) for t in answer.json()["details"]["tokens"]]
        assert_served_like_reference(model, list(tokenizer(prompt).input_ids), tokens, tol=TOL)


def test_stream_equals_the_whole_answer(server: LiveServer, pirate_reference: Any) -> None:
    prompt = _chat(pirate_reference[1], QUESTIONS[0])
    client = Client(server.url, timeout=600, headers={"x-merge-mode": "unmerged"})
    streamed = [r.token for r in client.generate_stream(prompt, max_new_tokens=MAX_NEW)]
    whole = _generate(server, prompt, "unmerged").json()
    assert [t.id for t in streamed] == [t["id"] for t in whole["details"]["tokens"]]
    assert "".join(t.text for t in streamed if not t.special) == whole["generated_text"]


def test_openai_chat_matches_the_reference(server: LiveServer, pirate_reference: Any) -> None:
    model, tokenizer = pirate_reference
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", default_headers={"x-merge-mode": "merged"})
    messages: Any = [{"role": "user", "content": QUESTIONS[0]}]
    model_id = client.models.list().data[0].id
    answer = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=MAX_NEW, logprobs=True, temperature=0
    )
    assert answer.usage is not None and answer.usage.completion_tokens == len(answer.choices[0].logprobs.content)
    prompt_ids = list(tokenizer(_chat(tokenizer, QUESTIONS[0]), add_special_tokens=False).input_ids)
    served = [(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c.token))[0], c.logprob)
              for c in answer.choices[0].logprobs.content]  # fmt: skip
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert_served_like_reference(model, prompt_ids, served, tol=TOL)


def test_refusals_and_metrics(server: LiveServer, pirate_reference: Any) -> None:
    prompt = _chat(pirate_reference[1], QUESTIONS[1])
    refused = _generate(server, prompt, "merged", do_sample=True, typical_p=0.5)
    assert refused.status_code == 422 and refused.json()["error_type"] == "validation"
    assert "typical_p" in refused.json()["error"]
    metrics = httpx.get(f"{server.url}/metrics").text
    for arm in ("merged", "unmerged"):
        assert re.search(rf'mergeserve_request_duration_seconds_count{{[^}}]*mode="{arm}"[^}}]*}} [1-9]', metrics)
        assert re.search(rf'vllm:generation_tokens_total{{[^}}]*model_name="{arm}"[^}}]*}} [1-9]', metrics)
    assert metrics.count("# TYPE vllm:generation_tokens_total counter") == 1


def _tree_pss(pid: int) -> int:
    """PSS of a process and all its descendants, read from /proc (shared pages counted once across them)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            total += int(line.split()[1]) * 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _tree_pss(int(child))
    return total


def test_the_served_process_tree_stays_within_the_memory_estimate(server: LiveServer) -> None:
    """The estimate `serve` logged before loading (server.boot.budget) against the memory its processes hold once
    ready and after serving: an estimate below it would let a config through that does not fit."""
    logged = re.search(r"memory: estimated peak memory ([\d.]+) GiB \(vLLM ab", server.read_log())
    assert logged is not None and server.proc is not None
    assert _tree_pss(server.proc.pid) <= float(logged.group(1)) * 2**30
