"""Boot phases: each one timed, logged with its duration and reported through `on_phase` (for the boot metrics),
and the last step every boot path shares: the engine over verified arms, warmed up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from server.config.schema import Config
from server.engine.engine import Engine, EngineInfo
from server.engine.half_linear import route_half_linears
from server.engine.kernels import prepack_arms, should_prepack
from server.engine.prefix_cache import DEFAULT_PREFIX_CACHE_TOKENS
from server.engine.slab_ops import load_slab_ops
from server.load.adapters import (
    AdapterInfo,
)
from server.merge.parity import ParityResult
from server.rss import peak_rss_bytes

log = logging.getLogger("mergeserve.boot")
PhaseCallback = Callable[[str, float], None]


class PhaseTimer:
    """Times each boot phase and records the process's peak RSS (VmHWM) at its end.

    VmHWM only grows, so `peak_rss[phase]` is the peak up to and including that phase: the first phase whose figure
    jumps is the one that holds the memory. Bounds on boot memory (issue 27) are stated in this figure.
    """

    def __init__(self, on_phase: PhaseCallback | None) -> None:
        self.on_phase = on_phase
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log.info("boot phase %s: started", name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings[name] = round(seconds, 4)
        peak = peak_rss_bytes()
        if peak is None:
            log.info("boot phase %s: done in %.2fs", name, seconds)
        else:
            self.peak_rss[name] = peak
            log.info("boot phase %s: done in %.2fs, peak RSS so far %.2f GiB", name, seconds, peak / 2**30)
        if self.on_phase:
            self.on_phase(name, seconds)


def device_summary(model: torch.nn.Module) -> dict[str, int]:
    """Parameter bytes per device: enough to see where device_map put the model."""
    out: dict[str, int] = {}
    for p in model.parameters():
        out[str(p.device)] = out.get(str(p.device), 0) + p.numel() * p.element_size()
    return out


def finish_boot(
    config: Config,
    timer: PhaseTimer,
    arms: dict[str, torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    adapter_infos: list[AdapterInfo],
    parity: ParityResult,
    cache: dict[str, Any],
    dtype_reason: str,
) -> Engine:
    """The engine over verified arms, warmed up."""
    model = next(iter(arms.values()))
    info = EngineInfo(
        model_id=config.model.model_id,
        model_sha=config.model.sha,
        mode=config.mode,
        adapters=adapter_infos,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        dtype_reason=dtype_reason,
        device_map=device_summary(model),
        boot_seconds=timer.timings,
        boot_peak_rss_bytes=timer.peak_rss,
        parity=parity,
        base_path=str(Path(config.model.local)),
        cache=cache,
        combine=config.combine.model_dump(),
    )
    packed = should_prepack(arms, config.engine.prepack_linear or "auto")
    if packed:
        with timer.phase("prepack"):
            prepack_arms(arms)
    info.engine = {"kind": "torch", "prepack_linear": packed}
    prefix_tokens = config.engine.prefix_cache_tokens
    prefix_tokens = DEFAULT_PREFIX_CACHE_TOKENS if prefix_tokens is None else prefix_tokens
    info.engine["prefix_cache_tokens"] = prefix_tokens
    fused = config.engine.fused_kernels or "auto"
    with timer.phase("kernels"):
        ops = load_slab_ops(fused, next(model.parameters()).device)
        routed = route_half_linears(arms, ops)
    info.engine["fused_kernels"] = ops is not None
    info.engine["half_linear"] = sum(routed.values()) > 0  # bf16/fp16 linears through server.engine.half_linear
    engine = Engine(arms, tokenizer, info, config.limits, prefix_tokens=prefix_tokens, slab_ops=ops,
                    kv_cache_gib=config.engine.kv_cache_gib)  # fmt: skip
    with timer.phase("warmup"):
        engine.warmup()
    return engine
