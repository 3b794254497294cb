"""Know before loading (server.boot.budget): `check` and the start of `serve` estimate the peak memory of a config
from its files' headers and refuse, in one line with exit 2, one that does not fit, before any weight loads.

The 8B and 1B shapes are scripts/make_scale_model.py's, written header-only: each safetensors file is its header
followed by a hole (a sparse file), so a 15 GB model costs a few KB of disk, and reading a weight would read zeros
for minutes; boot's weight loader is replaced by one that fails the test. The expected figures are worked out here
from the shape's own closed forms (make_scale_model.param_count, linear_shapes), not from the headers.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig

from server.boot import budget
from server.boot.boot import boot
from server.boot.memory import Available, free_memory
from server.boot.plan import check
from server.config.load import load_config
from server.errors import ExitCode, MergeserveError
from tests.live_server import REPO, free_port

sys.path.insert(0, str(REPO / "scripts"))
import make_scale_model as scale

GIB = 1 << 30
VOCAB = 49152  # the demo tokenizer's, as make_scale_model uses
RANK = 16
BYTES = {"BF16": 2, "F32": 4}
THIS_MACHINE = Available(24 * GIB, "test: all of a 24 GiB machine")


def _sparse_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """The safetensors header for `tensors` (name -> shape, dtype), then a hole where their bytes would be."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        end = offset + math.prod(shape) * BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    assert path.stat().st_blocks * 512 < 2**20  # sparse: the test never writes (or reads) the weights


def _write_shape(root: Path, name: str) -> tuple[Path, Path]:
    """(base, adapter) folders of the shape: config.json and the base's header (bf16), and an all-linear rank-16
    LoRA's adapter_config.json (PEFT's own LoraConfig) and header (float32, as PEFT saves it)."""
    shape = scale.SHAPES[name]
    base, adapter = root / name / "base", root / name / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    scale.llama_config(shape, VOCAB, "bfloat16").save_pretrained(base)
    specs = {s.name: (s.shape, "BF16") for s in scale.base_specs(shape, VOCAB)}
    _sparse_safetensors(base / "model.safetensors", specs)
    lora: dict[str, tuple[tuple[int, ...], str]] = {}
    for layer in range(shape.layers):
        for module, (n_out, n_in) in scale.linear_shapes(shape).items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            lora[f"{prefix}.lora_A.weight"] = ((RANK, n_in), "F32")
            lora[f"{prefix}.lora_B.weight"] = ((n_out, RANK), "F32")
    _sparse_safetensors(adapter / "adapter_model.safetensors", lora)
    fields = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(scale.TARGETS), task_type="CAUSAL_LM")
    saved = fields.to_dict() | {"target_modules": sorted(scale.TARGETS)}
    (adapter / "adapter_config.json").write_text(json.dumps(saved, default=str))
    return base, adapter


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("sparse-shapes")
    return {name: _write_shape(root, name) for name in ("1b", "8b")}


def _expected(name: str, mode: str, kv_tokens: int = 8 * 2048, prefix_tokens: int = 2048) -> dict[str, int]:
    """The estimate's parts for the shape in bf16 on the CPU, from the shape's closed forms."""
    shape = scale.SHAPES[name]
    weights = scale.param_count(shape, VOCAB) * 2
    linears = scale.linear_shapes(shape).values()
    adapters = shape.layers * sum(RANK * (n_in + n_out) for n_out, n_in in linears) * 4
    adapted = shape.layers * sum(n_out * n_in for n_out, n_in in linears) * 2
    per_token = shape.layers * 2 * shape.kv_heads * (shape.hidden // shape.heads)  # K and V values per token
    lanes = 2 if mode == "ab" else 1
    factor, extra = {"merged": (1.15, 1.5), "ab": (1.10, 1.5), "unmerged": (1.10, 1.5)}[mode]
    return {
        "weights": int(factor * weights),
        "boot": int(extra * GIB),
        "adapters": adapters,
        "adapted": adapted if mode == "ab" else 0,
        "kv": lanes * kv_tokens * per_token * 4,  # the slab of a bf16 model on the CPU is float32
        "prefix": lanes * prefix_tokens * per_token * 2,  # the prefix cache keeps bf16
    }


def _config(write_config: Callable[[dict[str, Any]], Path], paths: tuple[Path, Path], **extra: Any) -> Path:
    base, adapter = paths
    data = {"model": {"path": str(base), "dtype": "bfloat16"}, "adapters": [{"name": "lora", "path": str(adapter)}]}
    return write_config(data | extra)


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Boot must refuse before it loads anything: loading the base fails the test."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("boot loaded weights before the memory check refused")

    monkeypatch.setattr("server.boot.arms.load_base", fail)
    monkeypatch.setattr("server.boot.budget.available_memory", lambda: THIS_MACHINE)


def test_ab_on_the_8b_shape_is_refused_in_one_line_before_any_weight_loads(
    shapes: dict[str, tuple[Path, Path]], write_config: Callable[[dict[str, Any]], Path], no_weights: None
) -> None:
    config = load_config(_config(write_config, shapes["8b"], mode="ab"))
    est = budget.estimate(config, budget.read_files(config), available=THIS_MACHINE)
    assert est.peak == sum(_expected("8b", "ab").values()) and not est.fits
    assert est.peak > 31 * GIB  # 14.8 GB of weights, 14 GB more for the merged arm's adapted layers
    with pytest.raises(MergeserveError) as caught:
        boot(config)
    line = caught.value.line()
    assert caught.value.exit_code == ExitCode.BAD_INPUT and "\n" not in line
    assert line.startswith(f"memory: estimated peak memory {est.peak / GIB:.1f} GiB (ab, bfloat16: ")
    assert "24.0 GiB available (test: all of a 24 GiB machine)" in line and "second copy of the adapted layers" in line
    assert "; fix: mode merged, cache miss (" in line and "model.max_memory" in line
    planned = check(config, "8b.yaml")  # `mergeserve check` says the same line, with serve's exit code
    assert (planned.refusal, planned.exit_code) == (line, 2) and planned.memory["peak_bytes"] == est.peak


def test_the_1b_shape_fits_with_its_estimate_worked_out(
    shapes: dict[str, tuple[Path, Path]], write_config: Callable[[dict[str, Any]], Path]
) -> None:
    for mode in ("merged", "unmerged", "ab"):
        config = load_config(_config(write_config, shapes["1b"], mode=mode))
        est = budget.estimate(config, budget.read_files(config), available=THIS_MACHINE)
        assert est.peak == sum(_expected("1b", mode).values()) and est.fits, mode
    # engine.kv_cache_gib sizes the torch engine's KV cache too: 1 GiB for both arms together
    shape = scale.SHAPES["1b"]
    per_token = shape.layers * 2 * shape.kv_heads * (shape.hidden // shape.heads) * 4
    config = load_config(_config(write_config, shapes["1b"], mode="ab", engine={"kind": "torch", "kv_cache_gib": 1}))
    est = budget.estimate(config, budget.read_files(config), available=THIS_MACHINE)
    assert est.parts["KV cache"] == 2 * (GIB // 2 // per_token) * per_token


def test_a_merge_cache_hit_is_estimated_without_the_merge(
    shapes: dict[str, tuple[Path, Path]], write_config: Callable[[dict[str, Any]], Path]
) -> None:
    config = load_config(_config(write_config, shapes["8b"]))
    hit = budget.estimate(config, budget.read_files(config), cache_hit=True, available=THIS_MACHINE)
    expected = _expected("8b", "merged")
    weights = scale.param_count(scale.SHAPES["8b"], VOCAB) * 2
    assert hit.peak == int(1.05 * weights) + GIB + expected["kv"] + expected["prefix"]  # no adapters once merged
    assert hit.what == "merged, cache hit"


def test_max_memory_with_an_offload_folder_counts_only_the_resident_weights(
    shapes: dict[str, tuple[Path, Path]], write_config: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    tight = Available(20 * GIB, "test: 20 GiB")
    whole = load_config(_config(write_config, shapes["8b"]))
    est = budget.estimate(whole, budget.read_files(whole), available=tight)
    assert est.peak == sum(_expected("8b", "merged").values()) and not est.fits
    fix = budget.fix_for(whole, est)
    rest = sum(_expected("8b", "merged").values()) - _expected("8b", "merged")["weights"]
    cap = int((20 * GIB - rest) / 1.15 / GIB)  # whole GiB of weights that leave room for the rest
    assert f"mode merged with model.max_memory {{cpu: {cap}GiB}} and model.offload_folder" in fix
    assert "engine.kv_cache_gib" in fix
    model = {"path": str(shapes["8b"][0]), "dtype": "bfloat16", "max_memory": {"cpu": "6GiB"},
             "offload_folder": str(tmp_path / "offload")}  # fmt: skip
    capped = load_config(_config(write_config, shapes["8b"], model=model))
    est = budget.estimate(capped, budget.read_files(capped), available=tight)
    assert est.parts["weights (1.15 x 6.0 GiB)"] == int(1.15 * 6 * GIB) and est.fits
    assert est.peak == int(1.15 * 6 * GIB) + rest


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_check_and_serve_refuse_with_the_same_line_and_exit_2(
    shapes: dict[str, tuple[Path, Path]], write_config: Callable[[dict[str, Any]], Path]
) -> None:
    """Real processes and this machine's memory: 4096 slots of 131,072 tokens want a 128 TiB KV cache, which no
    machine has. Each process reads the free memory at its own time, and the fix offers what fits it: the lines
    are compared up to those."""
    limits = {"max_batch_size": 4096, "max_total_tokens": 131072}
    config = _config(write_config, shapes["8b"], limits=limits)
    checked = _cli("check", "--config", str(config))
    served = _cli("serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(free_port()))
    assert (checked.returncode, served.returncode) == (2, 2)
    (line,) = checked.stderr.strip().splitlines()
    free = re.compile(r"[\d.]+ GiB available \((MemAvailable|cgroup)[^)]*\): does not fit; fix: .*")
    assert free.search(line) and free.sub("", line) == free.sub("", served.stderr.strip().splitlines()[-1])
    assert "131072.0 GiB KV cache" in line  # 4096 x 131072 tokens x 256 KiB
    assert "boot phase" not in served.stderr  # refused before the first phase: no weight was read
    assert "memory:   estimated peak memory" in checked.stdout and "serve would refuse (exit 2)" in checked.stdout
    skipped = _cli("check", "--config", str(config), "--skip-memory-check")
    assert skipped.returncode == 0 and ": does not fit" in skipped.stdout and "serve would start" in skipped.stdout


def test_the_demo_fits_this_machine() -> None:
    proc = _cli("check", "--config", str(REPO / "configs" / "demo.yaml"), "--json")
    assert proc.returncode == 0, proc.stderr
    memory = json.loads(proc.stdout)["memory"]
    assert memory["fits"] and memory["dtype"] == "float32" and memory["peak_bytes"] < memory["available_bytes"]
    # SmolLM2-135M: 134.5M parameters in float32, tied head counted once
    assert memory["parts_bytes"]["weights (1.15 x 513 MiB)"] == int(1.15 * 134_515_008 * 4)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_free_memory_is_meminfo_or_the_tightest_cgroup_room(tmp_path: Path) -> None:
    meminfo = "MemTotal: 25000000 kB\nMemAvailable: 20000000 kB\n"
    v1 = _tree(tmp_path / "v1", {
        "proc/meminfo": meminfo, "proc/self/cgroup": "4:memory:/pod/box\n1:cpu:/\n",
        "sys/memory/pod/memory.limit_in_bytes": str(8 * GIB), "sys/memory/pod/memory.usage_in_bytes": str(3 * GIB),
        "sys/memory/pod/memory.stat": f"cache 0\ntotal_cache {GIB}\n",  # the whole subtree's page cache
        "sys/memory/pod/box/memory.limit_in_bytes": str(2**63 - 4096),  # v1's "no limit"
    })  # fmt: skip
    # the pod's 8 GiB less the 2 GiB it holds beyond page cache, below MemAvailable's 19.1 GiB
    assert free_memory(v1 / "proc", v1 / "sys") == (6 * GIB, "cgroup v1 limit 8.0 GiB less 2.0 GiB held")
    v2 = _tree(tmp_path / "v2", {
        "proc/meminfo": meminfo, "proc/self/cgroup": "0::/box\n", "sys/cgroup.controllers": "memory",
        "sys/box/memory.max": "max\n", "sys/memory.max": str(64 * GIB), "sys/memory.current": str(GIB),
        "sys/memory.stat": f"anon {GIB // 2}\nfile {GIB // 2}\n",
    })  # fmt: skip
    assert free_memory(v2 / "proc", v2 / "sys") == (20000000 * 1024, "MemAvailable 19.1 GiB")
    (v2 / "sys" / "box" / "memory.max").write_text(str(4 * GIB))  # now the process's own cgroup binds
    assert free_memory(v2 / "proc", v2 / "sys") == (4 * GIB, "cgroup v2 limit 4.0 GiB less 0.0 GiB held")
