"""Boot: fetch Hub ids (phase `download`, only when the config names one), load the base, attach the adapters, merge
(or not), verify, warm up.

Merged mode with the cache on goes through `server.boot.cached` (a verified entry skips the merge); every other
boot builds its arms in `server.boot.arms`. Both end in `server.boot.phases.finish_boot`.
"""

from __future__ import annotations

from server.boot.arms import build_arms
from server.boot.cached import boot_merged_with_cache
from server.boot.phases import PhaseCallback, PhaseTimer, finish_boot
from server.config.schema import Config
from server.engine.engine import Engine
from server.store.hub import has_hub_ids, resolve_hub


def boot(config: Config, on_phase: PhaseCallback | None = None) -> Engine:
    timer = PhaseTimer(on_phase)
    if has_hub_ids(config):
        with timer.phase("download"):
            config = resolve_hub(config)
    if config.engine.kind == "vllm":
        from server.boot.vllm import boot_vllm  # vLLM's boot path; its imports load only when it is chosen

        return boot_vllm(config, timer)
    if config.mode == "merged" and config.cache.enabled:
        return boot_merged_with_cache(config, timer)
    built = build_arms(config, timer)
    cache = {"enabled": False, "status": "disabled" if config.mode == "merged" else f"not used in {config.mode} mode"}
    return finish_boot(
        config, timer, built.arms, built.tokenizer, built.adapter_infos, built.parity, cache, built.dtype_reason
    )
