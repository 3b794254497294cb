"""Boot with `engine.kind: vllm`: our exact merge and parity gate in torch, then vLLM serves the checkpoints.

1. The merged checkpoint comes from the merge cache: a hit is used as stored; a miss is merged and gated in torch
   exactly as the torch engine's boot does, then stored. Every mode goes through it, because the entry also holds
   the probe ids and the unmerged reference logits that the vLLM gate needs.
2. The unmerged arm (unmerged, ab) is vLLM's LoRA path: a safetensors base (the model folder itself, or for a GGUF
   base its dequantized copy in the cache) plus one adapter that concatenates every configured adapter exactly
   (`server.vllm_engine.lora`), also in the cache.
3. The torch models are freed (and on a GPU their memory handed back), one AsyncLLM per arm starts, and each arm
   passes the vLLM gate (`server.vllm_engine.gate`) before the server reports ready. A gate or warm-up that fails
   shuts the started engines and their event loop down before the failure is raised.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peft import PeftConfig
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from server.boot.arms import BuiltArms, build_arms
from server.boot.budget import read_files
from server.boot.cached import resolved_dtype, store_entry
from server.boot.phases import PhaseTimer, log
from server.boot.stored_base import vllm_base
from server.config.schema import Config
from server.engine.engine import Engine, EngineInfo, Served
from server.engine.stopping import eos_ids
from server.load.adapters import AdapterInfo, adapter_info
from server.merge.parity import ParityResult, effect_expected
from server.store.cache import MergeCache
from server.vllm_engine import gate
from server.vllm_engine.engines import VllmMetrics, prompt_logprobs, start_arms
from server.vllm_engine.loop import LoopThread
from server.vllm_engine.lora import refuse_for_vllm, write_vllm_adapter
from server.vllm_engine.requests import unsupported
from server.vllm_engine.scheduler import VllmScheduler
from server.vllm_engine.settings import ArmPlan, memory_shares, on_cpu, parameter_bytes


@dataclass
class Checkpoints:
    merged_dir: Path
    tokenizer: PreTrainedTokenizerBase
    parity: ParityResult
    probe_ids: list[list[int]]
    reference: list[torch.Tensor]  # unmerged probe logits, (T, V) each
    base: list[torch.Tensor]  # the base model's probe logits (adapters off), (T, V) each
    report: dict[str, Any]


def _stale(config: Config, cache: MergeCache, key: str) -> str | None:
    """Why an entry that passed its file check cannot be served, or None.

    Its probe ids were recorded with the tokenizer it stores: one that now splits a probe differently (another
    `tokenizers` version) would make the gate compare the reference logits of other tokens. Entries stored before
    the gate measured the adapters' effect lack the base logits it needs.
    """
    stored = cache.probes(key)
    tokenizer = AutoTokenizer.from_pretrained(str(cache.entry(key)))
    for i, text in enumerate(config.parity.probes):
        if f"base.{i}" not in stored:
            return "the entry stores no base probe logits (built before the gate measured the adapters)"
        if tokenizer(text).input_ids != stored[f"ids.{i}"].tolist():
            return f"the cached tokenizer splits probe {i} differently from when the entry was built"
    return None


def _merged_entry(config: Config, timer: PhaseTimer, cache: MergeCache) -> Checkpoints:
    with timer.phase("cache_lookup"):
        key, inputs = cache.key(config)
        lock = cache.hold(key)
        manifest, problem = cache.check(key)
        corrupt = problem is not None  # a stale entry (below) is merged again but is not damaged
        if manifest is not None and (problem := _stale(config, cache, key)) is not None:
            manifest = None
    report: dict[str, Any] = {"enabled": True, "dir": str(cache.root), "key": key, "problem": problem,
                              "corrupt_entries": int(corrupt)}  # fmt: skip
    try:
        damaged = problem is not None
        if manifest is None:
            if damaged:
                log.warning("merge cache: entry %s is damaged (%s); merging again", key, problem)
                cache.discard(key)
            built: BuiltArms = build_arms(config.model_copy(update={"mode": "merged"}), timer)
            store_entry(cache, key, config, built, inputs, report, timer)
            del built
            gc.collect()
            manifest, problem = cache.check(key)
            if manifest is None:
                raise OSError(f"the merged checkpoint could not be stored in the cache: {report.get('problem')}")
            report.update(status="rebuilt" if damaged else "miss", hit=False)
        else:
            report.update(status="hit", hit=True, built_at=manifest.get("created"))
    finally:
        lock.release()
    entry = cache.entry(key)
    stored = cache.probes(key)
    n = len(config.parity.probes)
    return Checkpoints(
        merged_dir=entry,
        tokenizer=AutoTokenizer.from_pretrained(str(entry)),
        parity=ParityResult(**manifest["parity_at_build"]),
        probe_ids=[stored[f"ids.{i}"].tolist() for i in range(n)],
        reference=[stored[f"reference.{i}"] for i in range(n)],
        base=[stored[f"base.{i}"] for i in range(n)],
        report=report,
    )


def _plans(
    config: Config, cache: MergeCache, merged_dir: Path, base_dir: Path | None, timer: PhaseTimer
) -> list[ArmPlan]:
    arms = {"merged": ["merged"], "unmerged": ["unmerged"], "ab": ["merged", "unmerged"]}[config.mode]
    shares = memory_shares(config, arms)
    plans = []
    for arm in arms:
        if arm == "merged":
            plans.append(ArmPlan(arm, merged_dir, memory_share=shares[arm]))
            continue
        assert base_dir is not None  # stored first for the modes with an unmerged arm (boot_vllm)
        with timer.phase("adapter_store"):
            adapter = write_vllm_adapter(config, cache.root / "vllm-adapters", config.model.dtype)
        plans.append(ArmPlan(arm, base_dir, adapter.path, adapter.rank, shares[arm]))
    return plans


def _gate(loop: LoopThread, arms: dict[str, Any], ckpt: Checkpoints, config: Config) -> list[gate.GateResult]:
    results = []
    for name, arm in arms.items():
        served = prompt_logprobs(loop, name, arm, ckpt.probe_ids)
        probes = [
            (gate.reference_logprobs(ids, ref), gate.served_logprobs(ids, got), gate.reference_logprobs(ids, base))
            for ids, ref, got, base in zip(ckpt.probe_ids, ckpt.reference, served, ckpt.base, strict=True)
        ]
        r = gate.compare(name, probes, config.model.dtype, effect_expected(config.adapters))
        results.append(r)
        log.info("vLLM gate, arm %s: max abs logprob diff %.3g over %d positions (tolerance %.3g); adapter ratio "
                 "%s (at most %s) of the adapters' own effect, RMS %.3g", name, r.max_abs_diff, r.positions,
                 r.tolerance, r.adapter_ratio, r.max_adapter_ratio, r.adapter_effect_rms)  # fmt: skip
    gate.check(results)
    return results


def _info(config: Config, timer: PhaseTimer, ckpt: Checkpoints, infos: list[AdapterInfo], reason: str,
          results: list[gate.GateResult], device_map: dict[str, int] | None = None) -> EngineInfo:  # fmt: skip
    import vllm

    return EngineInfo(
        model_id=config.model.model_id,
        model_sha=config.model.sha,
        mode=config.mode,
        adapters=infos,
        dtype=config.model.dtype,
        dtype_reason=reason,
        device_map=device_map or {},
        boot_seconds=timer.timings,
        boot_peak_rss_bytes=timer.peak_rss,
        parity=ckpt.parity,
        base_path=str(config.model.local),
        cache=ckpt.report,
        combine=config.combine.model_dump(),
        engine={
            "kind": "vllm",
            "vllm_version": vllm.__version__,
            "config_hash": config.engine.compute_hash(),
            "gate": [r.as_dict() for r in results],
        },
    )


def _generation_config(folder: Path) -> Any:
    """What `eos_ids` reads off a model: its generation_config (chat models list end-of-turn ids there)."""
    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(folder)))
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        return None


def _release_device_memory() -> None:
    """Hand the merge's freed device memory back before vLLM starts. Each engine's start-up check needs
    `gpu_memory_utilization` of the device's total free (0.9 of 24 GB: 21.6 GB); blocks torch freed stay reserved
    by its caching allocator until emptied, so a merged model above ~8 GB (a 4B model in bf16) would fail it. No-op
    where CUDA was never initialized (here: untested on a GPU)."""
    gc.collect()  # the merged model may sit in a reference cycle: freed only by a collection
    torch.cuda.empty_cache()


def _serve(config: Config, timer: PhaseTimer, ckpt: Checkpoints, arms: dict[str, Any], loop: LoopThread,
           served: Served, info: dict[str, Any]) -> Engine:  # fmt: skip
    """Gate each arm, then warm up; the caller shuts the engines down if either fails."""
    with timer.phase("vllm_gate"):
        results = _gate(loop, arms, ckpt, config)
    engine_info = _info(config, timer, ckpt, info["adapters"], info["reason"], results, info["device_map"])
    engine = Engine({}, ckpt.tokenizer, engine_info, config.limits, served)
    with timer.phase("warmup"):
        engine.warmup()
    return engine


def _stored_dtype(config: Config, reason: str) -> tuple[Config, str]:
    """`dtype: checkpoint` as the dtype the base is stored in: vLLM has no such setting (its ModelConfig raises
    "Unknown dtype"), and its own `auto` serves a float32 checkpoint in float16 on a GPU."""
    if config.model.dtype != "checkpoint":
        return config, reason
    dtype = str(read_files(config).served("checkpoint")).removeprefix("torch.")
    model = config.model.model_copy(update={"dtype": dtype})
    return config.model_copy(update={"model": model}), f"checkpoint: stored in {dtype}"


def boot_vllm(config: Config, timer: PhaseTimer) -> Engine:
    refuse_for_vllm(config)  # before any weight loads: kinds vLLM cannot apply unmerged
    config, reason = _stored_dtype(*resolved_dtype(config))
    cache = MergeCache(config.cache.resolved_dir())
    cache.sweep()  # what a killed boot left: up to a model's size per folder
    # The unmerged arm's base first: a merge cache miss then reads that copy, not the GGUF a second time (~25 s).
    base_dir = vllm_base(config, cache, timer) if config.mode != "merged" else None
    ckpt = _merged_entry(config, timer, cache)
    plans = _plans(config, cache, ckpt.merged_dir, base_dir, timer)
    infos = [adapter_info(a, PeftConfig.from_pretrained(str(a.local))) for a in config.adapters]
    eos = eos_ids(ckpt.tokenizer, _generation_config(ckpt.merged_dir))
    device = "cpu" if on_cpu() else "cuda"
    device_map = {device: sum(parameter_bytes(plan, config.model.dtype) for plan in plans)}
    metrics = VllmMetrics()
    _release_device_memory()
    with timer.phase("vllm_start"):
        arms = start_arms(config, plans, config.model.dtype, metrics)
    loop = LoopThread()
    backend = VllmScheduler(arms, loop, ckpt.tokenizer, eos, config.limits.max_concurrent_requests)
    served = Served(backend, list(arms), eos, device, unsupported, metrics)
    try:
        return _serve(config, timer, ckpt, arms, loop, served,
                      {"adapters": infos, "reason": reason, "device_map": device_map})  # fmt: skip
    except BaseException:
        backend.close()  # stops reading, shuts each engine core down, stops the loop
        raise
