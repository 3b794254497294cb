"""The real demo, once: `mergeserve merge` output and a merge-cache hit both give the served merged model's logits.

One cold boot (GGUF base + pirate adapter, merged, stored in the cache), one hit, one export through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from server.boot.boot import boot
from server.config.load import load_config
from tests.conftest import load_as_served
from tests.demo_base import seed_cache
from tests.live_server import REPO

pytestmark = pytest.mark.e2e
DEMO = REPO / "configs" / "demo.yaml"


def test_export_and_cache_hit_reproduce_the_served_demo(tmp_path: Path, demo_base_copy: Path) -> None:
    seed_cache(demo_base_copy)  # the export and the cold boot merge onto the base copy (tests/demo_base.py)
    out = tmp_path / "pirate-merged"
    proc = subprocess.run(
        [sys.executable, "-m", "server", "merge", "--config", str(DEMO), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    _assert_standard_config(out)

    config = load_config(DEMO)
    cold = boot(config)
    hot = boot(config)
    assert (cold.info.cache["status"], hot.info.cache["status"]) == ("miss", "hit")
    assert "load_base" not in hot.info.boot_seconds and hot.info.cache["reproduced_exactly"] is True
    _assert_standard_config(Path(hot.info.cache["dir"]) / "entries" / hot.info.cache["key"])

    exported = load_as_served(out, cold)
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of Germany?"}]
    text = cold.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    ids = torch.tensor([cold.tokenize(text)])
    assert tokenizer(text).input_ids == ids[0].tolist() == hot.tokenize(text)
    with torch.inference_mode():
        served = cold.model(input_ids=ids).logits
        assert torch.equal(exported(input_ids=ids).logits, served)
        assert torch.equal(hot.model(input_ids=ids).logits, served)


def _assert_standard_config(folder: Path) -> None:
    """What `transformers serve` and other loaders need: the model class named, no private keys (the GGUF has none)."""
    raw = json.loads((folder / "config.json").read_text())
    assert raw.get("architectures") == ["LlamaForCausalLM"], raw.get("architectures")
    assert not [k for k in raw if k.startswith("_")], sorted(raw)
