"""The serving engine: one or two arms (merged, and/or PEFT with adapters on the side) behind a batching scheduler.

`submit` is the one entry point; `generate` (blocking) and `stream` (async) are the two ways to consume it. Each
arm is a scheduler lane, so an A/B engine never puts both arms in one batch.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn
from transformers import PreTrainedTokenizerBase

from server.config.schema import LimitsConfig
from server.engine.attention import use_slab_attention
from server.engine.kv_budget import KVBudget, lane_budget
from server.engine.kv_slab import refuse_length_dependent_rope, refuse_sliding_window
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.stopping import eos_ids
from server.engine.token_floor import TokenFloor, token_floor
from server.engine.types import Emit, Generation, Handle, PreparedRequest, Token
from server.load.adapters import AdapterInfo
from server.merge.parity import ParityResult


@dataclass
class EngineInfo:
    model_id: str
    mode: str
    adapters: list[AdapterInfo]
    dtype: str
    dtype_reason: str
    device_map: dict[str, int]
    boot_seconds: dict[str, float]
    parity: ParityResult | None
    base_path: str = ""
    model_sha: str | None = None  # the commit a Hub id resolved to, as TGI's /info reports it
    # Merge cache: key, hit or miss, and where the parity figures come from on a hit (see server.cached_boot).
    cache: dict[str, Any] = field(default_factory=dict)
    combine: dict[str, Any] = field(default_factory=lambda: {"method": "linear", "density": None, "seed": 0})
    engine: dict[str, Any] = field(default_factory=lambda: {"kind": "torch"})
    # VmHWM at the end of each phase (server.rss): this process's peak so far, so it never falls phase to phase.
    boot_peak_rss_bytes: dict[str, int] = field(default_factory=dict)


class Backend(Protocol):
    """What generates: the torch `Scheduler`, or `server.vllm_engine.scheduler.VllmScheduler`."""

    @property
    def death(self) -> str | None:
        """Why it can serve nothing more, if it cannot."""

    on_step: Callable[[str, int, int], None] | None

    @property
    def load(self) -> tuple[int, int]: ...

    def submit(self, request: PreparedRequest, emit: Emit, lane: str | None = None) -> Handle: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Served:
    """An engine other than the torch loop: its backend, the arms it serves, and what our stop rules need."""

    backend: Backend
    arms: list[str]
    eos_ids: set[int]
    device_type: str
    unsupported: Callable[[PreparedRequest], str | None] = lambda request: None
    collector: Any = None  # the backend's own Prometheus metrics, exposed on /metrics next to ours


class Engine:
    """The engine the HTTP layer talks to. Given torch arms it runs them in our `Scheduler`; given `served` (vLLM),
    it wraps that backend; tokenizing, detokenizing, stop rules and the streaming interface are the same for both."""

    def __init__(
        self,
        arms: dict[str, nn.Module],
        tokenizer: PreTrainedTokenizerBase,
        info: EngineInfo,
        limits: LimitsConfig,
        served: Served | None = None,
        prefix_tokens: int = 0,
        slab_ops: Any | None = None,
        kv_cache_gib: float | None = None,
    ) -> None:
        """`kv_cache_gib`: the torch engine's KV budget for all arms together (server.engine.kv_budget; None: from
        the limits); the budget is reported in `info.engine`."""
        self.tokenizer = tokenizer
        self.kv_budget: KVBudget | None = None
        self.info = info
        self.limits = limits
        self.token_floor: TokenFloor | None = token_floor(tokenizer)  # refuses hopeless inputs before tokenizing
        if served is None:
            self.model = next(iter(arms.values()))
            refuse_sliding_window(self.model, limits.max_total_tokens)
            refuse_length_dependent_rope(self.model, limits.max_total_tokens)
            for arm in arms.values():
                use_slab_attention(arm)
            self.kv_budget = lane_budget(self.model, limits, kv_cache_gib, len(arms), prefix_tokens)
            info.engine |= {"arms": list(arms), **self.kv_budget.as_dict()}
            eos = eos_ids(tokenizer, self.model)
            scheduler = Scheduler(arms, tokenizer, eos, limits.max_batch_size, limits.max_concurrent_requests,
                                  limits.max_batch_prefill_tokens, prefix_tokens=prefix_tokens,
                                  slab_ops=slab_ops, kv=self.kv_budget)  # fmt: skip
            served = Served(scheduler, list(arms), eos, next(self.model.parameters()).device.type)
        # Torch arms stay reachable by name (tests and tools read their weights); a served backend has no modules.
        self.arms: dict[str, Any] = arms or dict.fromkeys(served.arms)
        self.scheduler: Backend = served.backend
        self.eos_ids, self.device_type = served.eos_ids, served.device_type
        self.unsupported, self.collector = served.unsupported, served.collector

    @property
    def mode(self) -> str:
        """merged, unmerged, or ab (both arms)."""
        return self.info.mode

    def arm(self, requested: str | None) -> str:
        """The arm that serves a request: the one asked for, or this engine's only arm."""
        if requested is None:
            return next(iter(self.arms))
        if requested not in self.arms:
            raise KeyError(requested)
        return requested

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def submit(self, request: PreparedRequest, emit: Emit, arm: str | None = None) -> Handle:
        """Raises types.Overloaded past max_concurrent_requests."""
        return self.scheduler.submit(request, emit, self.arm(arm))

    def _finish(self, gen: Generation) -> Generation:
        # Token texts are decoded one by one with specials; the answer is decoded whole, without them, as TGI does.
        gen.text = self.decode([t.id for t in gen.tokens])
        return gen

    def generate(self, request: PreparedRequest, arm: str | None = None) -> Generation:
        """Block until the request is done (for boot warm-up, benchmarks and tests)."""
        events: queue.Queue[tuple[Token | BaseException, Generation]] = queue.Queue()
        self.submit(request, lambda item, gen: events.put((item, gen)), arm)
        while True:
            item, gen = events.get()
            if isinstance(item, BaseException):
                raise item
            if gen.finish_reason is not None:
                return self._finish(gen)

    async def stream(
        self, request: PreparedRequest, arm: str | None = None
    ) -> AsyncGenerator[tuple[Token, Generation], None]:
        """Yield (token, generation so far); leaving the loop early cancels the request and frees its slot."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Token | BaseException, Generation]] = asyncio.Queue()

        def emit(item: Token | BaseException, gen: Generation) -> None:
            # `gen` is the scheduler's snapshot as of this token, so it may wait in the queue unchanged.
            loop.call_soon_threadsafe(events.put_nowait, (item, gen))

        handle = self.submit(request, emit, arm)
        try:
            while True:
                item, gen = await events.get()
                if isinstance(item, BaseException):
                    raise item
                if gen.finish_reason is not None:
                    self._finish(gen)
                yield item, gen
                if gen.finish_reason is not None:
                    return
        finally:
            handle.cancel()  # a no-op once finished; otherwise the client left and the slot is freed

    def warmup(self) -> list[Generation]:
        """One short greedy generation per arm, so the first user request does not pay for lazy initialisation."""
        request = PreparedRequest(input_ids=self.tokenize("Hello"), params=SamplingParams(), max_new_tokens=4)
        return [self.generate(request, arm) for arm in self.arms]

    def close(self) -> None:
        self.scheduler.close()
