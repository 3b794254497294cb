"""End to end, in process: configs/demo-two-adapters.yaml (pirate 0.5 + bard 0.5 on SmolLM2-135M-Instruct) boots,
passes its gate, reports the mix in /info, and answers in a voice that carries both adapters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest
from server.http.app import create_app
from tests.demo_base import seed_cache
from tests.live_server import REPO

pytestmark = pytest.mark.e2e
BARD = re.compile(r"\b(thee|thou|thy|hath|doth|morrow|verily|forsooth|methinks|hark)\b", re.IGNORECASE)
PIRATE = re.compile(r"\b(arr+|matey|ahoy|ye|be|savvy|aye|me hearty)\b", re.IGNORECASE)


def test_two_adapter_demo_mixes_both_voices(demo_base_copy: Path) -> None:
    seed_cache(demo_base_copy)  # the merge reads the base copy (tests/demo_base.py)
    config = load_config(REPO / "configs" / "demo-two-adapters.yaml")
    engine = boot(config)
    try:
        assert engine.info.parity is not None and engine.info.parity.passed
        info = TestClient(create_app(engine, config)).get("/info").json()
        assert [(a["name"], a["weight"]) for a in info["adapters"]] == [("pirate", 0.5), ("bard", 0.5)]
        assert info["combine"] == {"method": "linear", "density": None, "seed": 0}
        messages = [{"role": "user", "content": "Hello!"}]
        prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        request = PreparedRequest(input_ids=engine.tokenize(prompt), params=SamplingParams(), max_new_tokens=32)
        text = engine.generate(request).text
        assert BARD.search(text) and PIRATE.search(text), text
    finally:
        engine.close()
