"""The demo's two adapters (pirate and bard at 0.5 each, on the GGUF base) as vLLM's one LoRA, against PEFT's merges.

The GGUF path of the writer: the module layout comes from the GGUF's metadata, and the base weights are never read.
The reference is transformers' GGUF loader in float32 plus 0.5 of each adapter's delta from PEFT's merge_and_unload.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.config.load import load_config
from tests.live_server import REPO
from tests.reference import demo_gguf

pytestmark = pytest.mark.e2e
WEIGHTS = {"pirate": 0.5, "bard": 0.5}


def test_demo_adapters_as_one_lora_answer_like_peft_merges(tmp_path: Path) -> None:
    from server.vllm_engine.lora import write_vllm_adapter

    data = yaml.safe_load((REPO / "configs" / "demo-two-adapters.yaml").read_text())
    data["mode"] = "unmerged"
    data["adapters"] = [
        {"name": n, "path": str(REPO / "configs" / "adapters" / n), "weight": w} for n, w in WEIGHTS.items()
    ]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    written = write_vllm_adapter(load_config(tmp_path / "config.yaml"), tmp_path / "vllm-adapters", "float32")

    folder, gguf = demo_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    total = {k: torch.zeros_like(v) for k, v in w0.items()}
    for name, weight in WEIGHTS.items():
        merged = PeftModel.from_pretrained(copy.deepcopy(base), str(REPO / "configs" / "adapters" / name))
        for k, v in merged.merge_and_unload().state_dict().items():
            total[k] += weight * (v - w0[k])
        del merged
    with torch.inference_mode():
        served = PeftModel.from_pretrained(copy.deepcopy(base), str(written.path)).eval()(input_ids=ids).logits
        bare = base(input_ids=ids).logits
        base.load_state_dict({k: w0[k] + total[k] for k in w0})
        reference = base(input_ids=ids).logits
    diff = (served - reference).abs().max().item()
    assert (reference - bare).abs().max().item() > 100 * diff, "the adapters must move the logits"
    assert diff < 1e-3, f"max |logit diff| {diff:.3g}"
    assert torch.equal(served.argmax(-1), reference.argmax(-1))
