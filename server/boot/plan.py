"""`mergeserve check`: what `serve` would do with a config, worked out from the files' metadata, no weights loaded.

It follows boot's own order and calls boot's own checks, so a refusal is the line serve would print: Hub ids are
resolved without downloading (`server.store.hub_lookup`), then the refusals serve makes before it loads a weight
(vLLM's unmerged kinds, a quantized base in a merging mode, each adapter_config.json's policy), then the dtype and
the merge cache entry serve would use. The cache key is computed as boot computes it (a sha256 of every input file,
remembered by size and mtime in the cache's file-hashes.json, so a second check reads no weight bytes at all) and
the entry is verified against its manifest as boot does.

What only the weights show is not checked: shapes against the base, NaN in an adapter, the parity gate. serve can
still refuse those (exit 2 or 3) after check passed.

`dtype: auto` is measured at boot by timing the engine's linear kernels (`server.merge.precision.pick_dtype`, up to
seconds on a CPU without native bf16); check does not measure it, and reports the cache entry for each dtype boot may
pick.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from server.boot.arms import refuse_quantized_merge
from server.boot.budget import UNREADABLE, estimate, read_files, refusal, serving_dtype
from server.config.schema import AdapterConfig, Config
from server.errors import MergeserveError
from server.load.adapters import BootError, read_adapter_config
from server.load.policy import kinds, quantization_method
from server.merge.precision import resolve_dtype_setting, serving_device
from server.store.cache import MergeCache
from server.store.hub import has_hub_ids
from server.store.hub_lookup import Located, locate_hub
from server.vllm_engine.lora import refuse_for_vllm, vllm_lora_problems

# What `dtype: auto` can resolve to (server.merge.precision.pick_dtype never picks float16).
AUTO_CHOICES = ("float32", "bfloat16")


@dataclass
class Plan:
    """check's findings; `refusal` is serve's one line when serve would refuse, and `exit_code` its code."""

    config: str
    mode: str
    engine: dict[str, Any]
    dtype: str
    dtype_reason: str
    base: dict[str, Any] = field(default_factory=dict)
    adapters: list[dict[str, Any]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    hub: list[dict[str, Any]] = field(default_factory=list)
    refusal: str | None = None
    exit_code: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _engine(config: Config) -> dict[str, Any]:
    """The engine and, for vLLM, the settings it would start with (nulls filled as server.vllm_engine fills them)."""
    engine = config.engine
    if engine.kind == "torch":
        return {"kind": "torch"}
    return {
        **engine.model_dump(exclude_none=True),
        "tensor_parallel_size": engine.tensor_parallel_size or 1,
        "pipeline_parallel_size": engine.pipeline_parallel_size or 1,
        "max_num_seqs": engine.max_num_seqs or config.limits.max_batch_size,
        "max_model_len": engine.max_model_len or config.limits.max_total_tokens,
    }


def _dtype(setting: str) -> tuple[list[str], str]:
    """(the dtypes boot may serve in, how it chooses); `auto` is left to boot, which measures it."""
    if setting == "auto":
        return list(AUTO_CHOICES), "measured at boot: bfloat16 if clearly faster than float32 here, else float32"
    name, reason = resolve_dtype_setting(setting)
    return [name], reason


def _refuse_before_load(config: Config) -> None:
    """Raise what boot raises before it loads a weight, in boot's order."""
    if config.engine.kind == "vllm":
        refuse_for_vllm(config)
    else:
        refuse_quantized_merge(config)


def _adapter(config: Config, adapter: AdapterConfig) -> dict[str, Any]:
    # serve's refusal for this adapter_config.json, raised as serve raises it; otherwise a LoraConfig
    cfg: Any = read_adapter_config(adapter)
    info: dict[str, Any] = {
        "name": adapter.name,
        "path": str(adapter.local),
        "weight": adapter.weight,
        "rank": cfg.r,
        "alpha": cfg.lora_alpha,
        "kinds": kinds(cfg),
    }
    if config.engine.kind == "vllm" and config.mode != "merged":
        info["vllm_lora_problems"] = vllm_lora_problems(adapter.local)
    return info


def _base(config: Config) -> dict[str, Any]:
    local = config.model.local
    kind = "gguf" if local.suffix == ".gguf" else "folder"
    return {"path": str(local), "id": config.model.model_id, "format": kind, "quantized": quantization_method(local)}


def _entry(cache: MergeCache, config: Config, dtype: str) -> dict[str, Any]:
    keyed = config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})})
    key, _ = cache.key(keyed)
    manifest, problem = cache.check(key)
    if manifest is not None:
        status = "hit"
    elif problem is not None:
        status = f"damaged ({problem}): serve would discard it and merge again"
    else:
        status = "miss"
    return {"dtype": dtype, "key": key, "status": status}


def _cache(config: Config, dtypes: list[str]) -> dict[str, Any]:
    """The merge cache entry serve would look up (vLLM always goes through the cache; torch in merged mode)."""
    if config.engine.kind != "vllm" and not (config.mode == "merged" and config.cache.enabled):
        return {"status": "disabled" if config.mode == "merged" else f"not used in {config.mode} mode"}
    root = config.cache.resolved_dir()
    if not (root / "entries").is_dir():
        return {"status": "miss", "dir": str(root), "note": "no cache folder yet"}
    cache = MergeCache(root)
    entries = [_entry(cache, config, dtype) for dtype in dtypes]
    status = entries[0]["status"] if len(entries) == 1 else "depends on the dtype boot measures"
    return {"status": status, "dir": str(root), "entries": entries}


def _memory(config: Config, cache: dict[str, Any]) -> tuple[dict[str, Any], BootError | None]:
    """The peak memory estimate serve makes before loading (server.boot.budget), and serve's refusal if it makes
    one."""
    if serving_device().type != "cpu":
        return {"note": f"not estimated: the weights go to {serving_device().type} memory"}, None
    try:
        files = read_files(config)
    except UNREADABLE as exc:  # as serve: the load will say what is wrong
        return {"note": f"not estimated: {exc}"}, None
    dtype, _ = serving_dtype(config)
    hit = any(e["status"] == "hit" and e["dtype"] == dtype for e in cache.get("entries", []))
    est = estimate(config, files, cache_hit=hit)
    return {**est.as_dict(), "summary": est.summary()}, refusal(config, est)


def check(config: Config, file: str) -> Plan:
    """What serve would do with `config` (read from `file`); never raises a MergeserveError, returns it as refusal."""
    start = time.perf_counter()
    dtypes, reason = _dtype(config.model.dtype)
    plan = Plan(file, config.mode, _engine(config), dtypes[0] if len(dtypes) == 1 else "auto", reason)
    try:
        located: list[Located] = []
        if has_hub_ids(config):
            config, located = locate_hub(config)
        plan.hub = [asdict(state) for state in located]
        if all(state.cached for state in located):
            plan.base = _base(config)
            _refuse_before_load(config)
            plan.adapters = [_adapter(config, a) for a in config.adapters]
            plan.cache = _cache(config, dtypes)
            plan.memory, refusal = _memory(config, plan.cache)
            if refusal is not None:
                raise refusal
        else:
            plan.cache = {"status": "unknown until serve downloads the Hub files"}
    except MergeserveError as exc:
        plan.refusal, plan.exit_code = exc.line(), int(exc.exit_code)
    plan.seconds = time.perf_counter() - start
    return plan


def _adapter_line(info: dict[str, Any]) -> str:
    kinds = ", ".join(info["kinds"]) or "plain LoRA"
    line = f"{info['name']}: weight {info['weight']}, rank {info['rank']}, alpha {info['alpha']}, {kinds}"
    line += f" ({info['path']})"
    if "vllm_lora_problems" in info:
        problems = info["vllm_lora_problems"]
        line += f"; vLLM LoRA: {'; '.join(problems) if problems else 'applies it unmerged'}"
    return line


def _cache_line(cache: dict[str, Any]) -> str:
    if "entries" not in cache:
        note = f" ({cache['note']}: {cache['dir']})" if "note" in cache else ""
        return f"{cache['status']}{note}"
    if len(cache["entries"]) == 1:
        return f"{cache['status']} (key {cache['entries'][0]['key']} in {cache['dir']})"
    each = ", ".join(f"{e['status']} if {e['dtype']}" for e in cache["entries"])
    return f"{cache['status']}: {each} ({cache['dir']})"


def report_lines(plan: Plan) -> list[str]:
    """The human report: one `name: value` line per finding, the verdict last."""
    engine = plan.engine["kind"]
    if engine == "vllm":
        engine += " (" + ", ".join(f"{k} {v}" for k, v in plan.engine.items() if k != "kind") + ")"
    lines = [f"config:   {plan.config}", f"mode:     {plan.mode}", f"engine:   {engine}"]
    lines += [f"hub:      {h['key']} {h['source']} -> commit {h['commit']}, {h['note']}" for h in plan.hub]
    if plan.base:
        quantized = f", {plan.base['quantized']}-quantized" if plan.base["quantized"] else ""
        lines.append(f"base:     {plan.base['id']} ({plan.base['format']}{quantized}: {plan.base['path']})")
    lines += [f"adapter:  {_adapter_line(info)}" for info in plan.adapters]
    lines.append(f"dtype:    {plan.dtype} ({plan.dtype_reason})")
    if plan.cache:
        lines.append(f"cache:    {_cache_line(plan.cache)}")
    if plan.memory:
        verdict = "" if "fits" not in plan.memory else ": fits" if plan.memory["fits"] else ": does not fit"
        lines.append(f"memory:   {plan.memory.get('summary', plan.memory.get('note'))}{verdict}")
    if plan.refusal is not None:
        lines.append(f"verdict:  serve would refuse (exit {plan.exit_code}): {plan.refusal}")
    else:
        lines.append("verdict:  serve would start (weights are checked at boot: shapes, NaN, the parity gate)")
    lines.append(f"checked in {plan.seconds:.2f}s without loading weights")
    return lines
