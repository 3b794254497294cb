"""scripts/make_scale_model.py: its `tiny` output loads in transformers and PEFT, is seeded, and mergeserve serves it.

Seed 0 runs in-process first (the GGUF tokenizer conversion is paid once); then the command line runs seed 0 again
in a subprocess with that saved tokenizer while seed 1 runs in-process beside it: equal files from two processes also
rule out hash-ordered output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest
from tests.live_server import REPO

sys.path.insert(0, str(REPO / "scripts"))
import make_scale_model

SHARD_MB = 16  # below the tiny model's 29 MB, so the index names more than one shard
PROMPT = "The capital of France is"


def cli_args(out: Path, seed: int, *extra: str) -> list[str]:
    return ["tiny", str(out), "--seed", str(seed), "--shard-mb", str(SHARD_MB), *extra]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """again: seed 0 in-process, tokenizer from the GGUF; cli: seed 0 by the command line; other: seed 1 in-process
    (both with the tokenizer `again` saved)."""
    root = tmp_path_factory.mktemp("scale")
    out = {name: root / name for name in ("cli", "again", "other")}
    assert make_scale_model.main(cli_args(out["again"], 0)) == 0
    saved = ("--tokenizer", str(out["again"] / "base"))
    command = [sys.executable, str(REPO / "scripts" / "make_scale_model.py"), *cli_args(out["cli"], 0, *saved)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert make_scale_model.main(cli_args(out["other"], 1, *saved)) == 0
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "peak RSS" in stdout
    return out


@pytest.fixture(scope="module")
def tiny(outputs: dict[str, Path]) -> Path:
    return outputs["cli"]


def digests(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def formula_params(config: dict[str, int | bool]) -> int:
    """Llama's parameter count from config.json alone: embeddings (twice if untied), 4 attention and 3 MLP
    projections and 2 RMSNorms per layer, the final norm."""
    h, v, i, layers = (int(config[k]) for k in ("hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers"))
    kv = int(config["num_key_value_heads"]) * h // int(config["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h * (1 if config["tie_word_embeddings"] else 2) + layers * per_layer + h


def test_tiny_loads_in_transformers_with_sane_logits_and_the_formula_count(tiny: Path) -> None:
    config = json.loads((tiny / "base" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    index = json.loads((tiny / "base" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(tiny / "base").eval()
    assert model.dtype == torch.bfloat16
    assert model.num_parameters() == formula_params(config)
    tok = AutoTokenizer.from_pretrained(tiny / "base")
    assert len(tok) == 49152 and tok.chat_template  # the demo's tokenizer, chat template included
    with torch.no_grad():
        logits = model(**tok(PROMPT, return_tensors="pt")).logits[0, -1].float()
    assert torch.isfinite(logits).all() and logits.std() > 0.05


@pytest.mark.parametrize("shape", sorted(make_scale_model.SHAPES))
def test_every_shape_names_the_tensors_transformers_builds(shape: str) -> None:
    """Checked on the meta device, so 8b costs no memory: the same names and shapes, and the same count as the
    config formula (about 1.07e9 for 1b and 7.5e9 for 8b with vocab 49152)."""
    config = make_scale_model.llama_config(make_scale_model.SHAPES[shape], 49152, "bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    specs = make_scale_model.base_specs(make_scale_model.SHAPES[shape], 49152)
    assert {s.name: s.shape for s in specs} == expected
    assert sum(s.numel for s in specs) == formula_params(config.to_dict()) == model.num_parameters()


def test_adapter_loads_in_peft_and_moves_the_logits_without_wrecking_them(tiny: Path) -> None:
    adapter = load_file(tiny / "adapter" / "adapter_model.safetensors")
    modules = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for k in adapter}
    assert modules == set(make_scale_model.TARGETS)
    assert all(t.abs().amax() > 0 for t in adapter.values())  # B too: init_lora_weights=False, not PEFT's zero B
    base = AutoModelForCausalLM.from_pretrained(tiny / "base", dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny / "base")(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(tiny / "adapter")).eval()(ids).logits
    change = (after - before).std() / before.std()
    assert 0.02 < change < 0.5, f"the adapter moves the logits by {change:.3f} of their std"


def test_same_seed_writes_identical_files_and_another_seed_other_weights(outputs: dict[str, Path]) -> None:
    first, again, other = (digests(outputs[name]) for name in ("cli", "again", "other"))
    assert again == first
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 3  # two base shards and the adapter
    assert all(other[name] != first[name] for name in weights)


def test_mergeserve_boots_it_merged_and_generates_what_peft_merged_does(tiny: Path, tmp_path: Path) -> None:
    data = {
        "model": {"path": str(tiny / "base"), "id": "scale-tiny", "dtype": "float32"},
        "adapters": [{"name": "random", "path": str(tiny / "adapter")}],
        "mode": "merged",
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 8},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    engine = boot(load_config(tmp_path / "config.yaml"))
    try:
        assert engine.info.parity is not None and engine.info.parity.passed
        ids = engine.tokenize(PROMPT)
        served = [t.id for t in engine.generate(PreparedRequest(ids, SamplingParams(), 6)).tokens]
    finally:
        engine.close()
    base = AutoModelForCausalLM.from_pretrained(tiny / "base", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tiny / "adapter")).merge_and_unload().eval()
    with torch.no_grad():
        out = merged.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert served == out[0, len(ids) :].tolist()
