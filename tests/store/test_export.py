"""Offline export (`mergeserve merge`): a standard checkpoint that loads with plain transformers and equals the server.

All on the tiny random Llama; the real demo round trip lives in test_cache_demo.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from server.boot.boot import boot
from server.config.load import load_config
from server.store.export import export_merged
from tests.conftest import build_adapter, exported_weights, load_as_served
from tests.live_server import REPO, free_port

Writer = Callable[[dict[str, Any]], Path]
TEXT = "Arr matey, the capital of France is Paris."


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_export_loads_with_transformers_and_equals_the_served_model(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tiny_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    tiny_config_data["adapters"].append({"name": "beta", "path": str(tiny_adapters["beta"]), "weight": 0.5})
    tiny_config_data["cache"] = {"enabled": False}
    config = load_config(write_config(tiny_config_data))
    out = tmp_path / "merged"
    result = export_merged(config, out, max_shard_bytes=100_000)
    files = {p.name for p in out.iterdir()}
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json"} <= files
    assert not any(f.startswith("adapter") for f in files)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_base / name).read_bytes(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is True
    assert result.model_bytes == sum(t.numel() * t.element_size() for t in exported_weights(out).values())

    served = boot(config)
    exported = load_as_served(out, served)
    ids = torch.tensor([served.tokenize(TEXT)])
    assert ids[0].tolist() == AutoTokenizer.from_pretrained(out)(TEXT).input_ids and ids.shape[1] > 3
    assert torch.equal(_logits(served.model, ids), _logits(exported, ids))  # exact, float32


def test_float16_export_rounds_the_float32_merge_once(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    config = load_config(write_config(tiny_config_data))
    export_merged(config, tmp_path / "f32")
    export_merged(config, tmp_path / "f16", dtype="float16")
    wide, narrow = exported_weights(tmp_path / "f32"), exported_weights(tmp_path / "f16")
    assert all(v.dtype == torch.float16 for v in narrow.values())
    assert all(torch.equal(wide[k].half(), narrow[k]) for k in wide)
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["torch_dtype"] == "float16"


def test_adapter_on_one_side_of_tied_embeddings_unties_them(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    head = build_adapter(tiny_base, tmp_path / "head", seed=7, targets=["lm_head"])
    # PEFT also saves the (tied) base matrix of a targeted head; keep only the LoRA tensors, as a trained adapter has.
    stored = load_file(str(head / "adapter_model.safetensors"))
    save_file({k: v for k, v in stored.items() if ".lora_" in k}, str(head / "adapter_model.safetensors"))
    tiny_config_data["adapters"] = [{"name": "head", "path": str(head)}]
    export_merged(load_config(write_config(tiny_config_data)), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    weights = exported_weights(tmp_path / "out")
    base = load_file(str(tiny_base / "model.safetensors"))
    assert torch.equal(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    unmerged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), head)
    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_base)(TEXT).input_ids])
    assert (_logits(exported, ids) - _logits(unmerged, ids)).abs().max().item() < 1e-4


def _merge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "merge", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_cli_refuses_a_bad_config_and_a_used_folder(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    tiny_config_data["modle"] = {}
    proc = _merge_cli("--config", str(write_config(tiny_config_data)), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "modle: unknown key; fix:" in proc.stderr and not (tmp_path / "out").exists()
    del tiny_config_data["modle"]
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    proc = _merge_cli("--config", str(write_config(tiny_config_data)), "--out", str(tmp_path / "used"))
    assert proc.returncode == 2 and "not an empty folder" in proc.stderr.strip().splitlines()[-1]
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("size", ["200MB", "1GiB", "5"])
def test_shard_sizes_parse(size: str) -> None:
    from server.store.checkpoint import parse_size

    assert parse_size(size) in (200 * 10**6, 2**30, 5)


@pytest.mark.parametrize(
    "combine",
    [{"method": "ties", "density": 0.5}, {"method": "dare_linear", "density": 0.5, "seed": 3},
     {"method": "dare_ties", "density": 0.7, "seed": 11}],
    ids=["ties", "dare_linear", "dare_ties"],
)  # fmt: skip
def test_export_of_a_mix_equals_merged_serving(
    combine: dict[str, Any], write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    """TIES/DARE change the weights on purpose; the export must write the very weights merged serving computes."""
    tiny_config_data["adapters"].append({"name": "beta", "path": str(tiny_adapters["beta"]), "weight": 0.5})
    config = load_config(write_config({**tiny_config_data, "combine": combine, "cache": {"enabled": False}}))
    export_merged(config, tmp_path / "out", max_shard_bytes=100_000)
    served = boot(config)
    state = served.model.state_dict()
    exact = load_config(write_config({**tiny_config_data, "cache": {"enabled": False}}))
    linear = boot(exact).model.state_dict()
    written = exported_weights(tmp_path / "out")
    assert any(not torch.equal(state[k], linear[k]) for k in written), "the mix equals the exact sum: a no-op test"
    for key, value in written.items():
        assert torch.equal(value, state[key]), key
    ids = torch.tensor([served.tokenize(TEXT)])
    assert torch.equal(_logits(load_as_served(tmp_path / "out", served), ids), _logits(served.model, ids))


@pytest.fixture
def gguf_shaped_base(tiny_base: Path, tmp_path: Path) -> Path:
    """The tiny base with the config a GGUF conversion gives: no `architectures`, a private `_model_name_or_path`."""
    base = tmp_path / "gguf-shaped"
    shutil.copytree(tiny_base, base)
    raw = json.loads((base / "config.json").read_text())
    del raw["architectures"]
    raw["_model_name_or_path"] = "Tiny 2L Mix1"
    (base / "config.json").write_text(json.dumps(raw))
    return base


def _assert_standard_config(folder: Path) -> None:
    raw = json.loads((folder / "config.json").read_text())
    assert raw.get("architectures") == ["LlamaForCausalLM"], raw.get("architectures")
    assert not [k for k in raw if k.startswith("_")]


@contextmanager
def _transformers_serve(folder: Path) -> Iterator[str]:
    """`transformers serve DIR` (the CLI shipped with transformers) on a free loopback port; yields its URL."""
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    args = [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log = folder.parent / "transformers-serve.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"transformers serve exited {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"transformers serve not up: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_export_is_served_by_transformers_serve(
    write_config: Writer, tiny_config_data: dict[str, Any], gguf_shaped_base: Path, tmp_path: Path
) -> None:
    """A standard checkpoint: `transformers serve` picks the model class from config.json's `architectures`."""
    tiny_config_data["model"]["path"] = str(gguf_shaped_base)
    out = tmp_path / "exported"
    export_merged(load_config(write_config(tiny_config_data)), out)
    _assert_standard_config(out)

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.inference_mode():
        greedy = AutoModelForCausalLM.from_pretrained(out).generate(ids, max_new_tokens=8, do_sample=False)
    want = greedy[0, ids.shape[1] :].tolist()
    with _transformers_serve(out) as url:
        body = {"model": str(out), "prompt": TEXT, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["usage"]["prompt_tokens"] == ids.shape[1]
    assert answer["usage"]["completion_tokens"] == len(want) > 0
    assert answer["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)


def test_cache_entry_config_is_a_standard_checkpoint(
    write_config: Writer, tiny_config_data: dict[str, Any], gguf_shaped_base: Path
) -> None:
    tiny_config_data["model"]["path"] = str(gguf_shaped_base)
    engine = boot(load_config(write_config(tiny_config_data)))
    assert engine.info.cache["status"] == "miss"
    _assert_standard_config(Path(engine.info.cache["dir"]) / "entries" / engine.info.cache["key"])
    engine.close()


def test_cli_exports_dtype_checkpoint_in_the_stored_dtype(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    """`model.dtype: checkpoint` means the checkpoint's own dtype, for the export as for serving."""
    half = tmp_path / "bf16-base"
    shutil.copytree(tiny_base, half)
    LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(half)
    tiny_config_data["model"].update(path=str(half), dtype="checkpoint")
    tiny_config_data["cache"] = {"enabled": False}
    path = write_config(tiny_config_data)
    proc = _merge_cli("--config", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    served = boot(load_config(path))
    assert served.model.dtype == torch.bfloat16
    state = served.model.state_dict()
    for key, value in exported_weights(tmp_path / "out").items():
        assert torch.equal(value, state[key]), key


def test_cli_turns_an_unexpected_failure_into_one_line(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    """A base whose safetensors file is garbage: whatever raises inside, the CLI exits 2 or 3 with one line."""
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_base, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    tiny_config_data["model"]["path"] = str(broken)
    proc = _merge_cli("--config", str(write_config(tiny_config_data)), "--out", str(tmp_path / "out"))
    assert proc.returncode in (2, 3), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeserve: ") and "fix: " in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    for args in (["--config", "x.yaml"], ["--config", "x.yaml", "--out", str(tmp_path / "o"), "--dtype", "fp8"]):
        proc = _merge_cli(*args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "fix: see mergeserve merge --help" in proc.stderr
