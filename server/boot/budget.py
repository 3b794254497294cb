"""Know before loading: the peak memory a config will take, estimated from the config and the files' headers, against
what this machine or container has free. `mergeserve check` prints it; `serve` refuses with one line (exit 2) before
any weight loads when it does not fit, unless `engine.memory_check: false` (or `--skip-memory-check`).

What is estimated: the peak resident memory of the serving process (VmHWM, the figure issue 27's bounds are stated
in; for the vLLM engine, its processes together):
- the weights in the serving dtype (`model.dtype`; `auto` is measured at boot, so the estimate assumes float32, the
  larger of its two choices, and says so; `checkpoint`: as stored), or, with `model.max_memory` on the CPU and an
  offload folder, the part that stays in memory;
- the mode's boot overhead on top of them, as issue 27 bounds it (the constants below);
- the adapters as PEFT loads them (half-precision files upcast to float32: PEFT's autocast_adapter_dtype), which
  stay on the side in unmerged and ab mode and until the merge in merged mode;
- in ab mode, a second copy of every weight an adapter changes (the merged arm's, server.merge.apply.merged_twin);
- the engine's serving memory: the torch engine's KV slab and prefix cache per arm (server.engine.kv_budget).

The vLLM engine (server.boot.vllm) peaks in the larger of two phases: the torch merge in this process on a merge
cache miss (merged mode's bound; on a hit only the probes load), then, with the torch models freed, vLLM: this
process as its front end and per arm an engine core holding the arm's weights (the unmerged arm's base plus its
LoRA), vLLM's own overhead and its KV cache: `engine.kv_cache_gib` split by the arms' memory shares, or, when null,
what vLLM on the CPU sizes for itself: each worker grows to gpu_memory_utilization x its share x the node's memory
(vllm.v1.worker.cpu_worker). On a GPU the weights and KV cache live in device memory, which is not estimated.

What is available (`available_memory`): MemAvailable from /proc/meminfo (free memory plus the page cache and slabs
the kernel can reclaim without swapping), or, if a cgroup on this process's path has a memory limit (v2 memory.max,
v1 memory.limit_in_bytes), that limit less the cgroup's memory other than page cache, whichever is smaller; plus this
process's own resident memory, which the estimate already counts (an interpreter with torch imported). Not counted:
swap, memory other processes take after the estimate, and the page cache of the files read while loading (the kernel
drops it first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from server.boot.memory import Available, available_memory, mem_total
from server.config.schema import Config
from server.engine.kv_budget import GIB, KVShape, kv_budget
from server.engine.prefix_cache import DEFAULT_PREFIX_CACHE_TOKENS
from server.errors import MergeserveError
from server.load.adapters import BootError
from server.merge.precision import serving_device
from server.store.cache import MANIFEST, MergeCache
from server.store.checkpoint import parse_size
from server.store.inventory import Inventory, adapted_modules, adapter_inventory, base_inventory, numel
from server.vllm_engine.settings import CPU_MEMORY_UTILIZATION, memory_shares, on_cpu

log = logging.getLogger("mergeserve.budget")


@dataclass(frozen=True)
class Bound:
    """Peak = factor x resident weights + extra bytes, and why."""

    factor: float
    extra: int
    reason: str


# Issue 27 (item 1) bounds the boot's peak RSS per mode; the boot streams every phase by layer or tensor to keep them,
# and tests assert them on a 1B-shape model. The extra is read as GiB (the issue says GB: 7 % more headroom).
MERGED_MISS = Bound(1.15, int(1.5 * GIB), "merged, cache miss: the model, plus one layer's float32 delta and check "
                    "buffers at a time, the interpreter, torch and the tokenizer")  # fmt: skip
MERGED_HIT = Bound(1.05, GIB, "merged, cache hit: the stored merge loaded as it is, no base or adapter weights")
UNMERGED = Bound(1.10, int(1.5 * GIB), "unmerged: the base with the adapters on the side and the parity gate's probes")
# ab: UNMERGED plus the merged arm's own copy of every adapted weight (everything else is shared between the arms).
# vLLM's own memory, measured with configs/demo-vllm.yaml (vLLM 0.32 CPU, enforce_eager, ab: SmolLM2-135M float32,
# 0.50 GiB of weights per arm, kv_cache_gib 2) on the 2-core development machine: the process tree's PSS once ready
# (shared pages counted once; RSS counts the libraries in every process) was 6.51 GiB: this process as the front end
# 1.04 GiB (torch models freed; RSS 1.21), and per arm an EngineCore process 0.46 GiB (RSS 0.63) and a worker
# 2.26-2.27 GiB (RSS 2.44) holding 0.50 GiB of weights and 1.00 GiB of KV cache, so 0.77 GiB of its own. Rounded
# up: the estimate for that config is 6.7 GiB.
VLLM_FRONTEND = int(1.1 * GIB)
VLLM_ENGINE_CORE = int(1.3 * GIB)  # per arm: the EngineCore process and its worker beyond weights and KV cache
ASSUMED_FOR_AUTO = "float32"  # the larger of auto's choices (server.merge.precision.pick_dtype)


@dataclass
class Estimate:
    """One mode's peak memory: its parts (label -> bytes), their sum, and the memory available."""

    what: str  # "ab", "merged, cache miss", ...
    dtype: str
    dtype_note: str
    parts: dict[str, int]
    available: Available
    alternatives: dict[str, int] = field(default_factory=dict)  # another setting -> its peak

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.available.bytes

    def summary(self) -> str:
        parts = " + ".join(f"{size(v)} {k}" for k, v in self.parts.items() if v)
        return (f"estimated peak memory {size(self.peak)} ({self.what}, {self.dtype}{self.dtype_note}: {parts}), "
                f"{size(self.available.bytes)} available ({self.available.source})")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "dtype": self.dtype, "dtype_note": self.dtype_note.lstrip(", "),
                "peak_bytes": self.peak, "parts_bytes": dict(self.parts), "available_bytes": self.available.bytes,
                "available_from": self.available.source, "fits": self.fits,
                "alternatives_bytes": dict(self.alternatives)}  # fmt: skip


def size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def serving_dtype(config: Config) -> tuple[str, str]:
    """(the dtype the estimate assumes, how it was chosen: printed after the dtype)."""
    setting = config.model.dtype
    if setting == "auto":
        return ASSUMED_FOR_AUTO, ", assumed for dtype auto (measured at boot; bfloat16 needs less)"
    if setting == "checkpoint":
        return setting, " (as stored)"
    return setting, ""


def _cpu_cap(config: Config) -> int | None:
    """model.max_memory's cap on the CPU in bytes, when the layers past it go to disk (an offload folder is set)."""
    cap = (config.model.max_memory or {}).get("cpu")
    if cap is None or config.model.offload_folder is None:
        return None
    return cap if isinstance(cap, int) else parse_size(str(cap).replace(" ", ""))


@dataclass(frozen=True)
class Files:
    """What the config's files hold, read once from their headers and sized in any dtype."""

    hf_config: Any  # the base's transformers config
    kv_shape: KVShape  # what its KV cache holds per token
    base: Inventory
    adapters: list[Inventory]

    def served(self, dtype: str) -> torch.dtype:
        """The dtype the weights are served in: `dtype`, or for `checkpoint` the first floating tensor's."""
        if dtype != "checkpoint":
            return cast(torch.dtype, getattr(torch, dtype))
        return next((t.dtype for t in self.base.tensors if t.dtype.is_floating_point), torch.float32)

    def adapters_loaded(self) -> int:
        """The adapters as PEFT loads them: half-precision weights upcast to float32 (its autocast_adapter_dtype)."""
        return sum(
            inv.bytes_as(None) + sum(numel(t.shape) * 2 for t in inv.tensors if t.dtype in _HALF)
            for inv in self.adapters
        )

    def adapted(self) -> int:
        """Elements of the base weights the adapters change, every adapter's modules together."""
        modules: dict[str, int] = {}
        for inv in self.adapters:
            modules |= adapted_modules(inv)
        return sum(modules.values())


_HALF = (torch.float16, torch.bfloat16)


# What reading the files' headers raises when they cannot be sized (a truncated file, an unknown dtype or
# architecture): serve then boots without an estimate, and loading the files says what is wrong with them.
UNREADABLE = (MergeserveError, OSError, ValueError, KeyError)


def read_files(config: Config) -> Files:
    pickle = config.security.allow_pickle
    hf_config, base = base_inventory(config.model, pickle)
    adapters = [adapter_inventory(a.local, pickle) for a in config.adapters]
    return Files(hf_config, KVShape.of(hf_config), base, adapters)


@dataclass(frozen=True)
class Sizes:
    """A config's memory in one dtype and mode."""

    weights: int  # the whole model
    resident: int  # what stays in memory: the weights, or the max_memory cap with disk offload
    adapters: int  # as PEFT loads them
    adapted: int  # ab's second copy: the base weights the adapters change
    kv: int  # the torch engine's KV slabs, every arm's
    prefix: int  # its prefix caches, every arm's
    kv_floor: int  # the smallest kv_cache_gib it accepts (one request of max_total_tokens per arm), in bytes


def sizes(config: Config, files: Files, dtype: str) -> Sizes:
    served = files.served(dtype)
    weights = files.base.bytes_as(served)
    cap = _cpu_cap(config)
    kv = prefix = floor = 0
    if config.engine.kind == "torch":
        tokens, lanes = config.engine.prefix_cache_tokens, 2 if config.mode == "ab" else 1
        budget = kv_budget(files.kv_shape, served, serving_device().type, config.limits,
                           config.engine.kv_cache_gib, lanes,
                           DEFAULT_PREFIX_CACHE_TOKENS if tokens is None else tokens)  # fmt: skip
        kv, prefix = lanes * budget.bytes, lanes * budget.prefix_bytes
        floor = lanes * config.limits.max_total_tokens * budget.bytes_per_token
    resident = weights if cap is None else min(weights, cap)
    return Sizes(weights, resident, files.adapters_loaded(), files.adapted() * served.itemsize, kv, prefix, floor)


def torch_parts(mode: str, cache_hit: bool, s: Sizes) -> tuple[str, dict[str, int]]:
    """(what, parts) of the torch engine's peak in `mode`."""
    if mode == "merged":
        bound = MERGED_HIT if cache_hit else MERGED_MISS
        what = "merged, cache hit" if cache_hit else "merged, cache miss"
    else:
        bound, what = UNMERGED, mode
    parts = {
        f"weights ({bound.factor:g} x {size(s.resident)})": int(bound.factor * s.resident),
        "boot overhead": bound.extra,
        "adapters": 0 if cache_hit and mode == "merged" else s.adapters,
        "second copy of the adapted layers": s.adapted if mode == "ab" else 0,
        "KV cache": s.kv,
        "prefix cache": s.prefix,
    }
    return what, parts


def estimate(config: Config, files: Files, cache_hit: bool = False, available: Available | None = None) -> Estimate:
    """The peak of the config's mode and engine in the dtype `serving_dtype` assumes, with the other modes and
    bfloat16 as alternatives (the torch engine)."""
    dtype, note = serving_dtype(config)
    available = available or available_memory()
    if config.engine.kind == "vllm":
        what, parts = vllm_parts(config, cache_hit, sizes(config, files, dtype))
        return Estimate(what, dtype, note, parts, available)
    mine = sizes(config, files, dtype)
    what, parts = torch_parts(config.mode, cache_hit, mine)
    result = Estimate(what, dtype, note, parts, available)
    result.alternatives = _alternatives(config, files, dtype, cache_hit, result, mine)
    return result


def _alternatives(
    config: Config, files: Files, dtype: str, cache_hit: bool, est: Estimate, mine: Sizes
) -> dict[str, int]:
    """Settings that need less, and their peaks: a smaller KV cache, the other modes, disk offload (a CPU cap on
    the weights that leaves room for the rest of a merged boot), bfloat16."""
    found, available = {}, est.available
    room = available.bytes - (est.peak - mine.kv)  # what the KV cache could have beside the rest
    if mine.kv > room >= mine.kv_floor:
        gib_fit = int(room / GIB * 10) / 10
        found[f"engine.kv_cache_gib {gib_fit:g} (requests wait past it)"] = est.peak - mine.kv + int(gib_fit * GIB)
    for mode in ("merged", "unmerged"):
        if mode != config.mode:
            other = sizes(config.model_copy(update={"mode": mode}), files, dtype)
            label, other_parts = torch_parts(mode, cache_hit and mode == "merged", other)
            found[f"mode {label}"] = sum(other_parts.values())
    merged = sizes(config.model_copy(update={"mode": "merged"}), files, dtype)
    _, merged_parts = torch_parts("merged", False, merged)
    beside = sum(merged_parts.values()) - int(MERGED_MISS.factor * merged.resident)  # all but the weights
    cap = int((available.bytes - beside) / MERGED_MISS.factor / GIB)  # whole GiB the merge leaves for weights
    if 0 < cap * GIB < merged.weights:
        name = f"mode merged with model.max_memory {{cpu: {cap}GiB}} and model.offload_folder"
        found[name] = beside + int(MERGED_MISS.factor * cap * GIB)
    if files.served(dtype) == torch.float32:
        _, half = torch_parts(config.mode, cache_hit, sizes(config, files, "bfloat16"))
        found["model.dtype bfloat16"] = sum(half.values())
    return found


def fix_for(config: Config, est: Estimate) -> str:
    """The refusal's fix: the settings that would fit, with their estimates."""
    options = [f"{name} ({size(peak)})" for name, peak in est.alternatives.items() if peak <= est.available.bytes]
    if config.engine.kind == "torch" and not any("max_memory" in o for o in options):
        options.append("model.max_memory {cpu: <GiB>} with model.offload_folder (mode merged: the layers past the "
                       "cap stay on disk)")  # fmt: skip
    options.append("more memory, or engine.memory_check: false to boot anyway")
    return ", or ".join(options)


def refusal(config: Config, est: Estimate) -> BootError | None:
    """serve's refusal (exit 2) when the estimate does not fit: the estimate, what is available and the fix; None
    when it fits or engine.memory_check is off."""
    if est.fits or not config.engine.memory_check:
        return None
    return BootError(f"{est.summary()}: does not fit", fix_for(config, est), "memory")


def refuse_if_too_big(config: Config, files: Files, cache_hit: bool = False) -> Estimate:
    """Raise `refusal`, or log the estimate (a warning when it does not fit and the check is off)."""
    est = estimate(config, files, cache_hit)
    refused = refusal(config, est)
    if refused is not None:
        raise refused
    if est.fits:
        log.info("memory: %s: fits", est.summary())
    else:
        log.warning("memory: %s: does not fit; booting anyway (engine.memory_check: false)", est.summary())
    return est


def vllm_parts(config: Config, cache_hit: bool, s: Sizes) -> tuple[str, dict[str, int]]:
    """(what, parts) of the vLLM engine's larger phase."""
    merge = {
        f"weights ({MERGED_MISS.factor:g} x {size(s.weights)}, torch merge)": 0
        if cache_hit
        else int(MERGED_MISS.factor * s.weights),
        "boot overhead": MERGED_MISS.extra if not cache_hit else VLLM_FRONTEND,
        "adapters": 0 if cache_hit else s.adapters,
    }
    arms = {"merged": ["merged"], "unmerged": ["unmerged"], "ab": ["merged", "unmerged"]}[config.mode]
    shares = memory_shares(config, arms)
    serve = {"vLLM front end": VLLM_FRONTEND}
    for arm in arms:
        weights = s.weights + (s.adapters if arm == "unmerged" else 0)
        if config.engine.kv_cache_gib is not None:
            kv = int(config.engine.kv_cache_gib * GIB * shares[arm])
        elif on_cpu():
            utilization = config.engine.gpu_memory_utilization or CPU_MEMORY_UTILIZATION
            kv = max(int(utilization * shares[arm] * mem_total()) - weights - VLLM_ENGINE_CORE, 0)
        else:
            kv, weights = 0, 0  # device memory
        serve[f"{arm} arm: weights"] = weights
        serve[f"{arm} arm: engine core"] = VLLM_ENGINE_CORE
        serve[f"{arm} arm: KV cache"] = kv
    merged_peak, serve_peak = sum(merge.values()), sum(serve.values())
    phase = "merge cache hit" if cache_hit else "merge cache miss"
    if serve_peak >= merged_peak:
        return f"vLLM {config.mode}, serving ({phase}; the torch phase before it: {size(merged_peak)})", serve
    return f"vLLM {config.mode}, torch merge before vLLM starts (serving then: {size(serve_peak)})", merge


def cache_entry_exists(config: Config, dtype: str) -> bool:
    """Whether the merge cache holds a finished entry for the config in `dtype` (found by its key, as boot finds it:
    the inputs' digests, remembered by the cache; the entry's files are verified at boot, not here)."""
    cached = config.engine.kind == "vllm" or config.mode == "merged"
    root = config.cache.resolved_dir()
    if not (config.cache.enabled and cached and (root / "entries").is_dir()):
        return False
    cache = MergeCache(root)
    key, _ = cache.key(config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})}))
    return (cache.entry(key) / MANIFEST).is_file()


def check_memory(config: Config) -> Estimate | None:
    """serve's estimate before any weight loads (after Hub files are downloaded): refuses when it does not fit (see
    `refuse_if_too_big`); None where nothing is estimated (a GPU, whose memory is not modelled, or files whose
    headers cannot be read: loading them will say why)."""
    if serving_device().type != "cpu":
        log.info("memory: not estimated: the weights go to %s memory, which the estimate does not model",
                 serving_device().type)  # fmt: skip
        return None
    try:
        files = read_files(config)
    except UNREADABLE as exc:
        log.warning("memory: not estimated: %s", exc)
        return None
    dtype, _ = serving_dtype(config)
    est = estimate(config, files)
    hit = not est.fits and cache_entry_exists(config, dtype)  # a hit needs less; hashing the inputs only if it matters
    return refuse_if_too_big(config, files, cache_hit=hit)
