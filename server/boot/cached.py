"""Boot in merged mode through the merge cache (server.cache).

Miss: the usual load_base / load_adapters / merge / verify, then `cache_store` writes the merged checkpoint with the
probe logits and the parity result. Hit: `cache_hit` loads the merged checkpoint straight from the entry (no base, no
adapter weights), then `verify` runs the probes. Every boot starts with `cache_lookup`: hashing the inputs (fast for
unchanged files), waiting for the key's lock (another replica may be merging) and checking every file of the entry
against its manifest. A damaged entry is logged, counted, deleted and rebuilt; it is never served.

The parity gate on a hit, honestly: the unmerged model is not loaded on a hit (that would cost the full cold load
the cache exists to avoid). The entry stores the unmerged model's probe logits, in the serving dtype and (half
precision) in float32, computed when it was built from the same files (the key covers them); the loaded merged
model is judged against those by the same criterion (server.merge.parity.judge) as a cold boot judges the fresh
merge: in half precision, its error against the float32 logits may not exceed the stored unmerged logits' own by
more than the gate's slack. On top, /info reports whether the loaded model reproduced the merged logits recorded at
build time bit for bit (it does on the same machine and library versions; a different CPU or GPU may differ in the
last bits without failing the gate). A failed gate or changed tokenization marks the entry damaged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from filelock import FileLock
from peft import PeftConfig

from server import __version__
from server.boot.arms import BuiltArms, build_arms, dtype_probe
from server.boot.phases import PhaseTimer, finish_boot, log
from server.config.schema import Config
from server.engine.engine import Engine
from server.errors import MergeserveError
from server.load.adapters import adapter_info, has_meta_weights, load_base
from server.merge.parity import effect_expected, judge, probe_logits
from server.merge.precision import resolve_dtype_setting
from server.store.cache import MergeCache

cache_log = logging.getLogger("mergeserve.cache")
HIT_REFERENCE = (
    "stored: unmerged probe logits (serving dtype, and float32 in half precision) recorded when the entry was built, "
    "compared with the loaded merged model"
)


class DamagedEntry(MergeserveError):
    """A cache entry that loads but does not reproduce what was stored; boot discards it and merges again."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem, "nothing: boot discards the entry and merges again")


def _stored_float32(config: Config, stored: dict[str, torch.Tensor], manifest: dict[str, Any]) -> tuple[Any, Any]:
    """(the float32 reference logits the entry stores, None), or (None, why there are none to gate against)."""
    n = len(config.parity.probes)
    if not config.parity.float32_reference:
        return None, "parity.float32_reference is false"
    if all(f"float32.{i}" in stored for i in range(n)):
        return [stored[f"float32.{i}"] for i in range(n)], None
    at_build = manifest.get("parity_at_build") or {}
    return None, at_build.get("float32_skipped") or "the cache entry stores no float32 reference"


def _serve_hit(
    config: Config, timer: PhaseTimer, cache: MergeCache, key: str, manifest: dict[str, Any]
) -> tuple[Any, ...]:
    with timer.phase("cache_hit"):
        # The entry is an ordinary safetensors model folder: load it as the base would be (dtype, device_map,
        # max_memory, safetensors only), with the config's own model settings.
        tokenizer, model = load_base(config.model.model_copy(update={"path": cache.entry(key)}))
        infos = [adapter_info(a, PeftConfig.from_pretrained(str(a.local))) for a in config.adapters]
    with timer.phase("verify"):
        stored = cache.probes(key)
        probes = config.parity.probes
        for i, text in enumerate(probes):
            if tokenizer(text, return_tensors="pt").input_ids[0].tolist() != stored[f"ids.{i}"].tolist():
                raise DamagedEntry(f"the cached tokenizer splits probe {i} differently")
        candidate = probe_logits(model, tokenizer, probes)
        unmerged = [stored[f"reference.{i}"] for i in range(len(probes))]
        float32, skipped = _stored_float32(config, stored, manifest)
        if not all(f"base.{i}" in stored for i in range(len(probes))):
            raise DamagedEntry("the entry stores no base probe logits (built before the gate measured the adapters)")
        base = [stored[f"base.{i}"] for i in range(len(probes))]
        exact = all(torch.equal(c, stored[f"merged.{i}"]) for i, c in enumerate(candidate))
        parity = judge(
            float32, unmerged, candidate, base, config.parity, model.dtype, skipped, effect_expected(config.adapters)
        )
    log.info("parity (against the reference logits stored in the cache entry): %s", parity.summary())
    if not parity.passed:
        raise DamagedEntry(f"the loaded model fails the parity gate: {parity.summary()}")
    if not exact:
        cache_log.warning("merge cache: merged logits differ in the last bits from those recorded at build time")
    return tokenizer, model, infos, parity, exact


def resolved_dtype(config: Config) -> tuple[Config, str]:
    """The config with `dtype: auto` replaced by this machine's choice, and the reason for it.

    Resolved once, before the key: the key, the merge and a hit's load then all use one dtype. Keyed as "auto", a
    bf16 machine's entry would be served in bf16 on an AVX2-only replica, where bf16 matmuls run tens of times slower.
    """
    dtype, reason = resolve_dtype_setting(config.model.dtype, dtype_probe(config))
    return config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})}), reason


def store_entry(cache: MergeCache, key: str, config: Config, built: BuiltArms, inputs: dict[str, Any],
           report: dict[str, Any], timer: PhaseTimer) -> None:  # fmt: skip
    """Write the fresh merge as the key's entry, with its probe ids and logits; a failure costs only the entry."""
    probes = {f"reference.{i}": r for i, r in enumerate(built.reference.served)}
    probes |= {f"float32.{i}": r for i, r in enumerate(built.reference.float32 or [])}
    probes |= {f"merged.{i}": c for i, c in enumerate(built.candidate)}
    probes |= {f"base.{i}": b for i, b in enumerate(built.base)}
    for i, text in enumerate(config.parity.probes):
        probes[f"ids.{i}"] = built.tokenizer(text, return_tensors="pt").input_ids[0]
    record = {"inputs": inputs, "probes": config.parity.probes, "parity_at_build": built.parity.as_dict(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mergeserve": __version__}  # fmt: skip
    offloaded = has_meta_weights(built.arms["merged"])
    if offloaded:
        # Disk-offloaded layers live in accelerate's offload store, not in memory: there is no whole model to write.
        cache_log.warning("merge cache: not storing %s: the model has layers offloaded to disk", key)
        report["problem"] = "not stored: layers offloaded to disk"
    with timer.phase("cache_store"):
        try:
            if not offloaded:
                entry = cache.store(key, config, built.arms["merged"], built.tokenizer, probes, record)
                cache_log.info("merge cache: stored %s (%s)", key, entry)
        except OSError as exc:  # a full or read-only disk costs the next boot a merge, not this one its model
            cache_log.warning("merge cache: could not store %s (%s); serving without the cache", key, exc)
            report.update(status="unavailable", problem=f"store failed: {exc}")


def open_cache(config: Config, report: dict[str, Any]) -> tuple[MergeCache, str, dict[str, Any], FileLock] | None:
    """(cache, key, key inputs, the key's lock, held), after sweeping what dead boots left; None when the folder
    cannot be used (read-only, full, not a folder), which is logged and put in `report` as status unavailable."""
    root = config.cache.resolved_dir()
    try:
        cache = MergeCache(root)
        swept = cache.sweep()
        if swept:
            cache_log.info("merge cache: deleted %d folder(s) left by boots that died: %s", len(swept), swept[:3])
        key, inputs = cache.key(config)
        lock = cache.hold(key)  # held until the entry is served or stored: a second replica waits here, then hits
    except OSError as exc:
        cache_log.warning("merge cache: cannot use %s (%s); merging without it", root, exc)
        report.update(status="unavailable", hit=False, problem=str(exc))
        return None
    return cache, key, inputs, lock


def boot_merged_with_cache(config: Config, timer: PhaseTimer) -> Engine:
    config, dtype_reason = resolved_dtype(config)
    root = config.cache.resolved_dir()
    report: dict[str, Any] = {"enabled": True, "dir": str(root), "corrupt_entries": 0, "problem": None}
    with timer.phase("cache_lookup"):
        opened = open_cache(config, report)
        if opened is not None:
            cache, key, inputs, lock = opened
            manifest, problem = cache.check(key)
    if opened is None:
        built = build_arms(config, timer)
        return finish_boot(
            config, timer, built.arms, built.tokenizer, built.adapter_infos, built.parity, report, dtype_reason
        )
    report["key"] = key
    try:
        if manifest is not None:
            try:
                tokenizer, model, infos, parity, exact = _serve_hit(config, timer, cache, key, manifest)
            except DamagedEntry as exc:
                problem = exc.problem
            else:
                report.update(status="hit", hit=True, reproduced_exactly=exact, parity_reference=HIT_REFERENCE,
                              built_at=manifest.get("created"))  # fmt: skip
                cache_log.info("merge cache: hit %s (%s)", key, cache.entry(key))
                reason = f"{dtype_reason}; cache hit: an entry built in this dtype"
                return finish_boot(config, timer, {"merged": model}, tokenizer, infos, parity, report, reason)
        if problem is not None:
            cache_log.warning("merge cache: entry %s is damaged (%s); discarding it and merging again", key, problem)
            report.update(corrupt_entries=1, problem=problem)
            cache.discard(key)
        built = build_arms(config, timer)
        report.update(status="rebuilt" if problem else "miss", hit=False,
                      parity_reference="computed at boot: the merged model against the unmerged one")  # fmt: skip
        store_entry(cache, key, config, built, inputs, report, timer)
    finally:
        lock.release()
    return finish_boot(
        config, timer, built.arms, built.tokenizer, built.adapter_infos, built.parity, report, dtype_reason
    )
