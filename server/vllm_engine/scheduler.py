"""The vLLM engine behind the torch engine's scheduler interface: `submit(request, emit, arm) -> Handle`.

vLLM batches and samples; we keep what makes the answer TGI's and identical across engines: the incremental
detokenizer, the stop rules, the slots behind max_concurrent_requests (429), the Generation each token carries,
and cancellation (a cancelled Handle aborts the vLLM request, freeing its KV blocks within a step).

Each arm is one AsyncLLM (its own engine-core process), driven from a `LoopThread`. Requests run as tasks on that
loop; `emit` is called from it, as the torch scheduler calls it from the model thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.engine.detokenizer import Detokenizer
from server.engine.scheduler import EngineDead
from server.engine.stopping import StoppingCriteria, record_token
from server.engine.types import Emit, Generation, Handle, PreparedRequest, Slots
from server.vllm_engine.loop import LoopThread
from server.vllm_engine.requests import sampling_kwargs

log = logging.getLogger("mergeserve.vllm")


@dataclass
class VllmArm:
    """One arm's engine and, for the unmerged arm, the LoRA request every generation carries."""

    engine: Any  # vllm.v1.engine.async_llm.AsyncLLM
    lora: Any = None  # vllm.lora.request.LoRARequest


def _top(logprobs: dict[int, Any], k: int) -> tuple[tuple[int, float], ...] | None:
    """vLLM's per-step dict (token id -> Logprob with a 1-based rank, the chosen token included even when it ranks
    below k) as our alternatives, most likely first."""
    if k <= 0:
        return None
    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in logprobs.items() if lp.rank is not None and lp.rank <= k)
    return tuple((tid, value) for _, tid, value in ranked if value > float("-inf"))


@dataclass(eq=False)
class _Request:
    request: PreparedRequest
    emit: Emit
    handle: Handle
    detokenizer: Detokenizer
    stopping: StoppingCriteria
    slots: Slots
    submitted: float = field(default_factory=time.perf_counter)
    gen: Generation = field(default_factory=Generation)
    _released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def release(self) -> None:
        """Give the slot back, once: from the loop when the request ends, or from the canceller's thread when it
        is cancelled before its task ever ran (then no code of ours runs on the loop for it)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self.slots.give_back()

    def push(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...] | None) -> bool:
        """Record one token; True once the request is finished. Inference starts when vLLM scheduled it."""
        token = self.detokenizer.push(token_id, logprob, top)
        started = self.submitted + self.gen.queue_seconds
        return record_token(self.gen, token, self.stopping, self.detokenizer.text, self.submitted, started)


class VllmScheduler:
    def __init__(
        self,
        arms: dict[str, VllmArm],
        loop: LoopThread,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        max_concurrent_requests: int,
    ) -> None:
        self.arms, self.loop = arms, loop
        self._tokenizer, self._eos_ids = tokenizer, frozenset(eos_ids)
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._slots = Slots(max_concurrent_requests)
        self._ids = itertools.count()
        self.on_step: Any = None  # the torch scheduler's per-step hook; vLLM's own metrics report its steps
        self._death: str | None = None
        self._closed = False  # a closed engine reports itself errored too, but that is no death

    @property
    def death(self) -> str | None:
        """Why nothing more can be served, or None. vLLM's own health: an arm's AsyncLLM is `errored` (what its
        `check_health` raises `dead_error` on) as soon as vLLM's monitor thread sees its engine-core process exit,
        idle or not, so /health turns 503 without waiting for a request to fail; or a request saw EngineDeadError."""
        if self._death is None and not self._closed:
            for name, arm in self.arms.items():
                if arm.engine.errored:
                    why = (str(arm.engine.dead_error).splitlines() or [""])[0]
                    self._death = (
                        f"the vLLM engine core of arm {name} is dead: {type(arm.engine.dead_error).__name__}: {why}"
                    )
                    log.critical("%s", self._death)
                    break
        return self._death

    @property
    def load(self) -> tuple[int, int]:
        """(unfinished, 0): vLLM queues inside its engine, so waiting requests count as running here."""
        return self._slots.used, 0

    def submit(self, request: PreparedRequest, emit: Emit, lane: str | None = None) -> Handle:
        request.check_submittable()
        arm = lane or next(iter(self.arms))
        if self.death is not None:
            raise EngineDead(f"vLLM engine died: {self.death}")
        self._slots.take()
        handle = Handle()
        row = _Request(
            request,
            emit,
            handle,
            Detokenizer(self._tokenizer, self._special_ids),
            StoppingCriteria(self._eos_ids, request.stop, request.max_new_tokens),
            self._slots,
        )
        future = self.loop.spawn(self._run(row, self.arms[arm], f"{arm}-{next(self._ids)}"))
        future.add_done_callback(lambda _: row.release())

        def withdraw() -> None:
            future.cancel()  # cancels the task on the loop; vLLM's generate aborts the request as it unwinds

        handle.withdraw = withdraw
        return handle

    async def _run(self, row: _Request, arm: VllmArm, request_id: str) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        try:
            kwargs, row.gen.seed = sampling_kwargs(row.request, self._eos_ids)
            params = SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
            row.gen.prompt_tokens = len(row.request.input_ids)
            prompt = TokensPrompt(prompt_token_ids=list(row.request.input_ids))
            stream = arm.engine.generate(prompt, params, request_id, lora_request=arm.lora)
            async for out in stream:
                if self._consume(row, out):
                    await stream.aclose()  # our stop rule ended it first: abort vLLM's request now
                    return
        except asyncio.CancelledError:
            pass  # the client left; vLLM's generate aborted the request on its way out
        except Exception as exc:
            log.warning("vLLM request %s failed: %s: %s", request_id, type(exc).__name__, exc)
            if type(exc).__name__ == "EngineDeadError":
                self._death = f"{type(exc).__name__}: {exc}"
            row.release()
            row.emit(exc, row.gen)

    def _consume(self, row: _Request, out: Any) -> bool:
        """Push the tokens of one vLLM output (DELTA: only the new ones); True once the request finished."""
        completion = out.outputs[0]
        if not row.gen.tokens and out.metrics is not None and out.metrics.scheduled_ts:
            row.gen.queue_seconds = max(out.metrics.scheduled_ts - out.metrics.queued_ts, 0.0)
        for i, token_id in enumerate(completion.token_ids):
            step = completion.logprobs[i] if completion.logprobs else {}
            chosen = step.get(token_id)
            logprob = float(chosen.logprob) if chosen is not None else float("nan")
            done = row.push(token_id, logprob, _top(step, row.request.top_logprobs))
            if done:
                row.release()  # before the last emit, so a client's next request never finds this one counted
            row.emit(row.gen.tokens[-1], copy.copy(row.gen))
            if done:
                return True
        if out.finished:
            # vLLM ended it without our rule firing (max_tokens or an EOS id is always ours too): a bug to see.
            raise RuntimeError(f"vLLM finished request early ({completion.finish_reason}) without our stop rule")
        return False

    def close(self) -> None:
        self._closed = True
        for arm in self.arms.values():
            try:
                # Stop reading outputs first: shutting the engine core down under a live reader logs it as a
                # crash (EngineDeadError) although nothing failed.
                self.loop.run(_stop_reading(arm.engine), timeout=10)
                arm.engine.shutdown()
            except Exception as exc:  # shutting down: report, do not mask the other arm's shutdown
                log.warning("vLLM shutdown: %s", exc)
        self.loop.stop()


async def _stop_reading(engine: Any) -> None:
    handler = getattr(engine, "output_handler", None)
    if handler is not None:
        handler.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await handler
