"""End to end: the demo's served tokens and logprobs against a plain forward of PEFT's own merge of the demo.

A real `python -m server serve` process in `ab` mode (both arms in one process) on loopback answers the ship
prompt alone and inside a batch of 8 concurrent chat prompts of different lengths, on each arm; every returned
token must have the logprob that one plain float32 forward over prompt + generated ids gives (within 1e-4) and be
its argmax. The reference is transformers' GGUF load + PEFT `merge_and_unload`, never mergeserve's merge or loop.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tests.demo_base import seed_cache
from tests.live_server import REPO, LiveServer
from tests.reference import assert_served_like_reference, reference_logprobs

pytestmark = pytest.mark.e2e
SHIP = "Tell me a long story about ship number 3."
OTHERS = [
    "What is the capital of Germany?",
    "Hi",
    "Explain in detail how a ship's compass works, and why sailors once feared that iron cargo could mislead it.",
    "Name three colours.",
    "Where be the treasure buried?",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
]
MAX_NEW = 48
TOL = 1e-4


@pytest.fixture(scope="module")
def server(demo_base_copy: Path) -> Any:
    seed_cache(demo_base_copy)  # served from the base copy; test_e2e_demo tests its first build (tests/demo_base.py)
    with LiveServer(REPO / "configs" / "demo-ab.yaml") as live:
        yield live


def test_the_arms_read_the_base_copy_already_in_the_cache(server: LiveServer, demo_base_copy: Path) -> None:
    info = httpx.get(f"{server.url}/info").json()
    assert Path(info["cache"]["base_entry"]).name == demo_base_copy.name
    assert "base_store" not in info["boot_seconds"]  # read, not dequantized from the GGUF and stored again


def _chat(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _generate(server: LiveServer, prompt: str, arm: str) -> dict[str, Any]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
    r = httpx.post(f"{server.url}/generate", json=body, headers={"x-merge-mode": arm}, timeout=600)
    assert r.status_code == 200, r.text
    assert r.headers["x-merge-mode"] == arm
    return dict(r.json())


def _check(reference: tuple[PreTrainedModel, PreTrainedTokenizerBase], prompt: str, answer: dict[str, Any]) -> None:
    model, tokenizer = reference
    prompt_ids = list(tokenizer(prompt).input_ids)
    assert answer["details"]["prefill"] == [] or len(answer["details"]["prefill"]) == len(prompt_ids)
    tokens = [(t["id"], t["logprob"]) for t in answer["details"]["tokens"]]
    _print_side_by_side(model, prompt_ids, tokens, tokenizer)
    assert_served_like_reference(model, prompt_ids, tokens, tol=TOL)


def _print_side_by_side(
    model: PreTrainedModel, prompt_ids: list[int], tokens: list[tuple[int, float]], tok: PreTrainedTokenizerBase
) -> None:
    """The evidence table (shown with pytest -s): served id and logprob next to the plain forward's."""
    logprobs = reference_logprobs(model, prompt_ids, [t for t, _ in tokens])
    worst = max(abs(lp - float(logprobs[i, t])) for i, (t, lp) in enumerate(tokens))
    print(f"\n{len(prompt_ids)} prompt tokens, {len(tokens)} served, max |served - forward| logprob {worst:.2e}")
    for i, (t, lp) in enumerate(tokens[:10]):
        print(f"  step {i:2d} id {t:5d} {tok.decode([t])!r:14} served {lp:9.5f} forward {float(logprobs[i, t]):9.5f}")


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_ship_prompt_alone(server: LiveServer, pirate_reference: Any, arm: str) -> None:
    prompt = _chat(pirate_reference[1], SHIP)
    _check(pirate_reference, prompt, _generate(server, prompt, arm))


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_ship_prompt_in_a_batch_of_eight(server: LiveServer, pirate_reference: Any, arm: str) -> None:
    prompts = [_chat(pirate_reference[1], q) for q in [SHIP, *OTHERS]]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: _generate(server, p, arm), prompts))
    lengths = {a["details"]["generated_tokens"] for a in answers}
    assert len(lengths) > 1  # rows left the batch at different steps, so later steps ran on a trimmed batch
    for prompt, answer in zip(prompts, answers, strict=True):
        _check(pirate_reference, prompt, answer)
