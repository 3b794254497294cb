"""Fixtures for the vLLM engine: a tiny Llama that vLLM's CPU kernels accept, its adapters, and a booted engine.

vLLM's CPU attention supports head sizes of 32 and up, so this model has 4 heads of 64 (the shared tiny model's 16
would be refused), and 2 KV heads so that tensor_parallel_size 2 divides both. Its init scale is 0.2, as the
`peaky` model's: near-uniform logits would let a wrong adapter pass a token-equality check by luck.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedModel

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from tests.conftest import CHAT_TEMPLATE, build_adapter, build_model, build_tokenizer

WEIGHTS = {"alpha": 0.7, "beta": -0.3}


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"base": folder, "alpha": adapter, "beta": adapter of another rank on other modules}."""
    root = tmp_path_factory.mktemp("vllm-model")
    base = root / "base"
    tok = build_tokenizer(base)
    build_model(base, vocab_size=len(tok), hidden=256, init_range=0.2)
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return {
        "base": base,
        "alpha": build_adapter(base, root / "alpha", seed=1, r=4, alpha=8),
        "beta": build_adapter(base, root / "beta", seed=2, r=8, alpha=4, targets=["q_proj", "v_proj", "down_proj"]),
    }


def vllm_config(model: dict[str, Path], folder: Path, **overrides: Any) -> Path:
    engine = {"kind": "vllm", "enforce_eager": True, "kv_cache_gib": 0.25, **overrides.pop("engine", {})}
    data = {
        "model": {"path": str(model["base"]), "id": "tiny-vllm", "dtype": "float32"},
        "adapters": [{"name": n, "path": str(model[n]), "weight": w} for n, w in WEIGHTS.items()],
        "mode": "ab",
        "limits": {
            "max_input_tokens": 64,
            "max_total_tokens": 128,
            "max_new_tokens": 16,
            "max_batch_size": 4,
            "max_concurrent_requests": 6,
        },
        "cache": {"dir": str(folder / "cache")},
        **overrides,
        "engine": engine,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def ab_engine(vllm_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Both arms on vLLM: the merged checkpoint, and the base with the two adapters as one concatenated LoRA."""
    engine = boot(load_config(vllm_config(vllm_model, tmp_path_factory.mktemp("ab"))))
    yield engine
    engine.close()


def weighted_reference(model: dict[str, Path]) -> PreTrainedModel:
    """base + w_a * alpha + w_b * beta, combined and merged by PEFT itself (its `cat` weighted adapter)."""
    base = LlamaForCausalLM.from_pretrained(model["base"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(model["alpha"]), adapter_name="alpha")
    peft.load_adapter(str(model["beta"]), adapter_name="beta")
    peft.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "mix", combination_type="cat")
    peft.set_adapter("mix")
    return peft.merge_and_unload().eval()
