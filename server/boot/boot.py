"""Boot: fetch Hub ids (phase `download`, only when the config names one), load the base, attach the adapters, merge
(or not), verify, warm up.

Merged mode with the cache on goes through `server.boot.cached` (a verified entry skips the merge); every other
boot builds its arms in `server.boot.arms`. Both end in `server.boot.phases.finish_boot`.

The torch engine boots on a thread of its own that ends with the boot. Every thread that runs a parallel torch op
keeps an OpenMP team (libgomp's worker threads) for as long as it lives, and once the teams of a process hold more
threads than there are CPUs, libgomp cuts each worker's spin-wait from 300,000 to 100 spins: between two ops the
model thread's workers fall asleep and every op then waits for a futex wake. A decode step does hundreds of small
parallel ops, so on the 2-core development machine one idle thread that had run the boot's forwards made the model
thread's steps 1.7-2x slower (SmolLM2 bf16, batch 1: 20.3 -> 41.1 ms; batch 8: 39.4 -> 57.9 ms; back to 19.6 and
41.8 once that thread ended). Booting on a thread that ends frees its team, so in a served process only the model
thread holds one. (`mergeserve serve` boots on a background thread anyway; this makes every caller get it.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from server.boot.arms import build_arms
from server.boot.budget import check_memory
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
    check_memory(config)  # before any weight loads: refuses a config whose estimated peak does not fit
    if config.engine.kind == "vllm":
        from server.boot.vllm import boot_vllm  # vLLM's boot path; its imports load only when it is chosen

        return boot_vllm(config, timer)  # the model runs in vLLM's own processes; its boot stays on this thread
    return on_ending_thread(lambda: _boot_torch(config, timer))


def on_ending_thread(work: Callable[[], Engine]) -> Engine:
    """Run `work` on a new thread and wait for it; its result, or its exception re-raised here. The thread ends
    with `work`, and its OpenMP team with it (see the module docstring)."""
    result: list[Engine] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # re-raised on the caller's thread, traceback included
            failure.append(exc)

    thread = threading.Thread(target=run, name="boot-torch", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _boot_torch(config: Config, timer: PhaseTimer) -> Engine:
    if config.mode == "merged" and config.cache.enabled:
        return boot_merged_with_cache(config, timer)
    built = build_arms(config, timer)
    cache: dict[str, Any] = {
        "enabled": False,
        "status": "disabled" if config.mode == "merged" else f"not used in {config.mode} mode",
    }
    if built.base_copy is not None:
        cache["base_entry"] = str(built.base_copy)  # the merge is not cached in this mode; the dequantized base is
    return finish_boot(
        config, timer, built.arms, built.tokenizer, built.adapter_infos, built.parity, cache, built.dtype_reason
    )
