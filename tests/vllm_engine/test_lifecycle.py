"""The vLLM engine's lifecycle (issue 28, items 11-14): a boot that fails after its engines started leaves nothing
running; an engine core that dies while idle turns /health to TGI's 503; the torch merge's device memory is handed
back before vLLM measures it; a damaged merge cache entry counts in the metrics, and model_info names the device.

Each vLLM boot here serves one merged arm (one engine-core process, ~40 s on 2 cores).
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

import server.boot.vllm as boot_vllm
from server.boot.boot import boot
from server.boot.cached import resolved_dtype
from server.boot.phases import PhaseTimer
from server.config.load import load_config
from server.engine.engine import Engine
from server.http.app import create_app
from server.http.metrics import Metrics
from server.store.cache import MergeCache
from server.vllm_engine import gate
from tests.vllm_engine.conftest import vllm_config


def _processes() -> dict[int, psutil.Process]:
    """This process's live descendants (vLLM's engine cores and what they start), by pid; not multiprocessing's
    resource tracker, which the first engine starts and which lives as long as this process, by design."""
    alive = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                alive[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    return alive


def _loop_threads() -> int:
    return sum(t.name == "mergeserve-vllm" and t.is_alive() for t in threading.enumerate())


def _left_after(before: dict[int, psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := [p for pid, p in _processes().items() if pid not in before]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("stage", ["gate", "warmup"])
def test_a_boot_that_fails_after_its_engines_started_leaves_nothing_running(
    vllm_model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Item 11: the engines started, then the vLLM gate (or the warm-up) failed: the engine-core processes and our
    event-loop thread must be gone when boot raises, or a CLI that refuses to serve still holds the model's memory."""

    def fail(*_: Any) -> None:
        raise RuntimeError(f"injected {stage} failure")

    monkeypatch.setattr(*((gate, "check", fail) if stage == "gate" else (Engine, "warmup", fail)))
    before, loops = _processes(), _loop_threads()
    with pytest.raises(RuntimeError, match=f"injected {stage} failure"):
        boot(load_config(vllm_config(vllm_model, tmp_path, mode="merged")))
    left = _left_after(before, 30)
    assert not left, f"still running: {[' '.join(p.cmdline()) or p.name() for p in left]}"
    assert _loop_threads() == loops


def test_an_engine_core_that_dies_while_idle_turns_health_to_503(vllm_model: dict[str, Path], tmp_path: Path) -> None:
    """Item 12: kill -9 the engine-core process of a served, idle engine. vLLM's own monitor marks its AsyncLLM
    errored; /health must say so (TGI's 503 "unhealthy") without waiting for a request to fail, and a request is
    answered at once. Item 14: model_info names the device vLLM serves on."""
    config = load_config(vllm_config(vllm_model, tmp_path, mode="merged"))
    before = _processes()
    engine = boot(config)
    try:
        with TestClient(create_app(engine, config)) as client:
            assert client.get("/health").status_code == 200
            cores = [p for pid, p in _processes().items() if pid not in before and "EngineCor" in p.name()]
            assert len(cores) == 1, [p.name() for p in _processes().values()]
            cores[0].kill()
            deadline = time.monotonic() + 30
            while (r := client.get("/health")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
            r = client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 424 and "died" in r.json()["error"]
            assert 'device="cpu"' in client.get("/metrics").text
    finally:
        engine.close()


def test_the_merges_device_memory_is_released_before_vllm_starts(
    vllm_model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 13. No GPU here: `torch.cuda.empty_cache` is replaced by a recorder, and vLLM's start by a stop. On a
    GPU the merged model's freed blocks stay in torch's caching allocator until it is emptied, and vLLM's start-up
    check counts them as taken; it must be emptied after the merged model is garbage and before vLLM starts.
    Untested on a GPU."""
    events: list[Any] = []
    merged: list[weakref.ref[torch.nn.Module]] = []
    real_build = boot_vllm.build_arms

    def build(*args: Any) -> Any:
        built = real_build(*args)
        merged.append(weakref.ref(built.arms["merged"]))
        events.append("merged")
        return built

    def start(*_: Any) -> None:
        events.append("vllm starts")
        raise RuntimeError("stopped before vLLM")

    monkeypatch.setattr(boot_vllm, "build_arms", build)
    monkeypatch.setattr(boot_vllm, "start_arms", start)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("emptied", merged[0]() is None)))
    with pytest.raises(RuntimeError, match="stopped before vLLM"):
        boot(load_config(vllm_config(vllm_model, tmp_path, mode="merged")))
    assert events == ["merged", ("emptied", True), "vllm starts"]


def test_a_damaged_entry_counts_in_the_corrupt_entries_metric(vllm_model: dict[str, Path], tmp_path: Path) -> None:
    """Item 14: the vLLM boot's merge cache found a damaged entry and rebuilt it; the metric must count it."""
    config, _ = resolved_dtype(load_config(vllm_config(vllm_model, tmp_path, mode="merged")))
    cache = MergeCache(config.cache.resolved_dir())
    first = boot_vllm._merged_entry(config, PhaseTimer(None), cache)
    shard = sorted(first.merged_dir.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    rebuilt = boot_vllm._merged_entry(config, PhaseTimer(None), cache)
    assert rebuilt.report["status"] == "rebuilt"
    metrics = Metrics()
    metrics.engine_ready(boot_vllm._info(config, PhaseTimer(None), rebuilt, [], "", []))
    assert "mergeserve_merge_cache_corrupt_entries_total 1.0" in generate_latest(metrics.registry).decode()
