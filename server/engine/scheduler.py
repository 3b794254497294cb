"""Iteration-level batching: requests join the running batch at step boundaries and leave as soon as they finish.

One thread owns the model. Each loop turn, per lane, it gives waiting requests the free slots of the lane's `Batch`,
runs one prefill forward (newcomers together, a long prompt one chunk at a time), runs one decode step for the
running rows, and hands every row its token. Rows that finish or whose client went away leave the batch before the
next step, so a long request never holds short ones back. The KV slab and the slot bookkeeping live in batch.py and
kv_slab.py, the stop rules in stopping.py and the incremental detokenizing in detokenizer.py; this module keeps the
thread, the lanes, the request slots, admission, and failure isolation (a request whose own prefill or sampling
fails fails alone; a failed decode step fails its lane's rows; a dead thread fails everything it held).

Numerics: each request samples from its own seeded generator, and a batched row sees the logits it would see alone
(see batch.py), so its output does not depend on what else is in the batch, up to float rounding.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function
from transformers import PreTrainedTokenizerBase

from server.engine.attention import wants_bool_mask
from server.engine.batch import Batch, Prefilling
from server.engine.detokenizer import Detokenizer
from server.engine.kv_budget import KVBudget
from server.engine.mixed import NotMixable
from server.engine.sampling import TokenChooser
from server.engine.stopping import StoppingCriteria, record_token
from server.engine.types import Emit, Generation, Handle, PreparedRequest, Slots

log = logging.getLogger("mergeserve.scheduler")
MIXED_FAILURE_LIMIT = 3  # mixed forwards failing in a row (not NotMixable) before a lane stops mixing


class EngineDead(RuntimeError):
    """The model thread died: nothing submitted will ever run, so requests fail at once instead of waiting."""


@dataclass(eq=False)  # rows are compared by identity: each is one request
class _Row:
    """One request on the model thread: its sampler, detokenizer and stop rules, and the output it emits."""

    request: PreparedRequest
    emit: Emit
    handle: Handle
    submitted: float
    slots: Slots
    detokenizer: Detokenizer
    stopping: StoppingCriteria
    device: torch.device  # the lane's: the penalties index the logits with all_ids, so both must live there
    admitted: float = 0.0
    released: bool = False
    chooser: TokenChooser = field(init=False)
    all_ids: torch.Tensor = field(init=False)  # (1, T + generated): what repetition penalties look at
    gen: Generation = field(init=False)

    def __post_init__(self) -> None:
        self.chooser = TokenChooser(self.request.params, self.request.top_logprobs, len(self.request.input_ids))
        self.all_ids = torch.tensor([self.request.input_ids], dtype=torch.long, device=self.device)
        self.gen = Generation(seed=self.chooser.seed, prompt_tokens=len(self.request.input_ids))

    @property
    def bound(self) -> int:
        """The most KV columns this request can reach: its prompt and every token it may generate."""
        return len(self.request.input_ids) + self.request.max_new_tokens

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots.give_back()

    def fail(self, exc: BaseException) -> None:
        """End the request with `exc`: its slot back first, then the error to its reader. A reader that cannot take
        it (its event loop closed, say) is past helping; letting that escape would fail the lane's other rows, then
        the model thread (`lane.fail` emits to the same reader again)."""
        self.release()
        try:
            self.emit(exc, self.gen)
        except Exception as unreachable:
            log.warning("request's reader refused its error (%s: %s): %s", type(unreachable).__name__, unreachable, exc)

    def advance(self, logits: torch.Tensor) -> bool:
        """logits: (1, V) for the next position. Choose the token and emit it; True when done (finished or
        cancelled)."""
        if self.handle.cancelled.is_set():
            self.release()
            return True
        # The labels name the per-token phases in a torch.profiler trace (scripts/profile_decode.py); they cost
        # about a microsecond each when no profiler runs.
        with record_function("row.sample"):
            token_id, logprob, top = self.chooser.choose(self.all_ids, logits)  # type: ignore[arg-type]
            self.all_ids = torch.cat([self.all_ids, self.all_ids.new_tensor([[token_id]])], dim=1)
        with record_function("row.detokenize"):
            gen, token = self.gen, self.detokenizer.push(token_id, logprob, top)
            done = record_token(gen, token, self.stopping, self.detokenizer.text, self.submitted, self.admitted)
        if done:
            self.release()
        # A snapshot: the reader runs on the event loop, maybe several steps behind this thread, and must see the
        # text and finish_reason as of this token, or it would end the stream early and drop the tokens between.
        # The token list is shared (it is only appended to), so it is complete in the final snapshot.
        with record_function("row.emit"):
            self.emit(token, copy.copy(gen))
        return done


def _fail_row(row: _Row, exc: BaseException) -> None:
    log.warning("request failed alone: %s: %s", type(exc).__name__, exc)
    row.fail(exc)


def _advance(row: _Row, logits: torch.Tensor) -> bool:
    """Advance one row of a decode step; a failure there (its own sampling) fails that row alone."""
    try:
        return row.advance(logits)
    except Exception as exc:
        _fail_row(row, exc)
        return True


class _Lane:
    """One model's running batch. Lanes never share a batch, so an A/B process never mixes arms in a forward."""

    def __init__(self, name: str, model: nn.Module, lock: threading.Condition, batch: Batch[_Row]) -> None:
        self.name, self.model, self.lock = name, model, lock
        self.device = next(model.parameters()).device
        self.waiting: deque[_Row] = deque()
        self.batch = batch
        self.mixes = wants_bool_mask(model)  # a mixed forward needs the slab's attention (server.engine.mixed)
        self.mixed_failures = 0  # mixed forwards failed in a row, other than NotMixable

    @property
    def rows(self) -> list[_Row]:
        """The running rows, in slot order."""
        return self.batch.rows

    @property
    def prefilling(self) -> list[_Row]:
        return [p.row for p in self.batch.prefilling]

    @property
    def load(self) -> tuple[int, int]:
        return len(self.rows) + len(self.batch.prefilling), len(self.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or not self.batch.idle

    def withdraw(self, row: _Row) -> None:
        """Drop a cancelled row that is still queued; once admitted, the scheduler releases it at its next turn."""
        with self.lock:
            if row in self.waiting:
                self.waiting.remove(row)
                row.release()

    def turn(self) -> int:
        """One turn of this lane: admit, then its forwards; -> the decode batch size (0: no row decoded).

        Rows decoding and prefill chunks waiting share one forward when the model allows it (server.engine.mixed);
        otherwise, or if that forward fails, the chunks get a prefill forward of their own and the rows a decode
        step, each with its own failure isolation."""
        chunks = self.admit()
        if chunks and self.rows and self.mixes:
            batch = self._mixed(chunks)
            if batch is not None:
                return batch
        if chunks:
            self._prefill(chunks)
        if self.batch.idle:
            self.batch.clear()
        return self.step() if self.rows else 0

    def admit(self) -> list[tuple[Prefilling[_Row], int]]:
        """Give waiting requests the free slots, in arrival order, while they fit the KV budget beside the rows held
        (the first that does not waits, as TGI's queue stops at max_batch_total_tokens; alone in the batch it is
        tried, and one too long for the whole budget fails alone); -> the prefill chunks for this turn's forward."""
        with self.lock:
            while self.waiting and self.batch.free > 0:
                bound = self.waiting[0].bound
                if not self.batch.idle and not self.batch.fits(bound):
                    break
                row = self.waiting.popleft()
                row.admitted = time.perf_counter()
                row.gen.queue_seconds = row.admitted - row.submitted
                try:
                    self.batch.add(row, list(row.request.input_ids), bound)
                except Exception as exc:  # out of `waiting` and not in the batch: only failing it here ends it
                    _fail_row(row, exc)
        for p in self.batch.prefilling:
            if p.row.handle.cancelled.is_set():
                p.row.release()
                self.batch.drop_prefilling(p.row)
        return self.batch.next_chunks()

    def _prefill(self, chunks: list[tuple[Prefilling[_Row], int]]) -> None:
        """One prefill forward. If a shared forward fails, each row is retried alone, so only the row whose own
        prefill fails (a prompt too long for memory, say) fails; the others and the running batch go on."""
        try:
            with record_function("prefill.forward"):
                finished = self.batch.prefill(self.model, chunks)
        except Exception as exc:
            if len(chunks) > 1:
                for chunk in chunks:
                    self._prefill([chunk])
                return
            self.batch.drop_prefilling(chunks[0][0].row)
            _fail_row(chunks[0][0].row, exc)
            return
        self._join(finished)

    def _join(self, finished: list[tuple[_Row, torch.Tensor]]) -> None:
        """Rows whose prompt is cached: each takes its first token from its prefill logits (1, V), then joins."""
        for row, logits in finished:
            if _advance(row, logits):
                self.batch.drop_prefilling(row)  # done after one token, cancelled, or its sampling failed
            else:
                self.batch.join(row)

    def step(self) -> int:
        """One decode step for every running row; returns the batch size."""
        with record_function("decode.step"):
            tokens = self._last_tokens()
            with record_function("decode.forward"):
                logits = self.batch.step(self.model, tokens)  # (B, V)
            self._advance_rows(logits)
            return len(tokens)

    def _mixed(self, chunks: list[tuple[Prefilling[_Row], int]]) -> int | None:
        """A decode step with the chunks in its forward (profiled as a step: its forward includes the chunks);
        None if the forward failed, before any bookkeeping: the caller reruns it apart, which rewrites every slab
        column it wrote."""
        with record_function("decode.step"):
            tokens = self._last_tokens()
            try:
                with record_function("decode.forward"):
                    logits, finished = self.batch.mixed(self.model, tokens, chunks)  # (B, V), finished prefills
            except Exception as exc:  # NotMixable, or a failure apart forwards would isolate to one row
                self._mixed_failed(exc)
                return None
            self.mixed_failures = 0
            self._advance_rows(logits)
        self._join(finished)
        return len(tokens)

    def _mixed_failed(self, exc: Exception) -> None:
        """A model that cannot mix would fail every turn's mixed forward: it stops mixing at once. Any other failure
        (an allocation, a row's bad input) may pass: mixing stops only after MIXED_FAILURE_LIMIT in a row, which
        bounds what a persistent one costs (a wasted forward per turn) without giving up on a transient one."""
        self.mixed_failures += 1
        if isinstance(exc, NotMixable) or self.mixed_failures >= MIXED_FAILURE_LIMIT:
            self.mixes = False
        after = "from now on" if not self.mixes else "this turn"
        log.warning("lane %s: mixed forward failed (%s: %s); prefills and decode steps run apart %s",
                    self.name, type(exc).__name__, exc, after)  # fmt: skip

    def _last_tokens(self) -> torch.Tensor:
        """(B, 1): each running row's last token, gathered on the device without a sync per row."""
        return torch.cat([row.all_ids[:, -1:] for row in self.batch.rows])

    def _advance_rows(self, logits: torch.Tensor) -> None:
        """logits (B, V): each running row takes its token; rows that finished leave the batch."""
        batch = self.batch
        keep = [i for i, row in enumerate(batch.rows) if not _advance(row, logits[i : i + 1])]
        if len(keep) < len(batch):
            with record_function("decode.filter"):
                batch.filter(keep)
        if batch.idle:
            batch.clear()  # frees the slab while the lane has nothing to do

    def orphans(self) -> list[_Row]:
        """Every request this lane holds, taken out of it, to fail them all when the model thread dies."""
        rows = [*self.waiting, *self.rows, *self.prefilling]
        self.waiting = deque()
        self.batch.clear()
        return rows

    def fail(self, exc: BaseException) -> None:
        """A forward or the batch bookkeeping failed: the slab may be half-written, so every admitted row fails."""
        failed = self.rows + self.prefilling
        log.exception("lane %s: decode failed; failing %d requests", self.name, len(failed))
        for row in failed:
            row.fail(exc)
        with self.lock:
            self.batch.clear()


class Scheduler:
    """Owns the model thread. With several lanes (A/B arms) it gives each busy lane one step per turn, in turn."""

    def __init__(
        self,
        models: dict[str, nn.Module],
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        max_batch_size: int,
        max_concurrent_requests: int,
        prefill_budget: int = 64,
        on_step: Callable[[str, int, int], None] | None = None,
        prefix_tokens: int = 0,
        slab_ops: Any | None = None,
        kv: KVBudget | None = None,
    ) -> None:
        """`kv`: each lane's KV budget (server.engine.kv_budget); None: no limit but the slots."""
        self.max_batch_size = max_batch_size
        self._slots = Slots(max_concurrent_requests)
        self.on_step = on_step  # (lane, batch size, queue size) after each decode step, for metrics
        self._wake = threading.Condition()
        self._tokenizer, self._eos_ids = tokenizer, frozenset(eos_ids)
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self.lanes = {
            name: _Lane(name, model, self._wake, Batch(max_batch_size, prefill_budget, prefix_tokens, slab_ops, kv))
            for name, model in models.items()
        }
        self._closed = False
        # Why the model thread died, if it did (close() is not a death): /health answers 503 and the CLI exits.
        self.death: str | None = None
        self._thread = threading.Thread(target=self._run, name="mergeserve-scheduler", daemon=True)
        self._thread.start()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests over all lanes."""
        loads = [lane.load for lane in self.lanes.values()]
        return sum(r for r, _ in loads), sum(w for _, w in loads)

    def submit(self, request: PreparedRequest, emit: Emit, lane: str | None = None) -> Handle:
        """Queue a request; `emit` is called from the scheduler thread with each token, or with an exception."""
        request.check_submittable()
        target = self.lanes[lane] if lane is not None else next(iter(self.lanes.values()))
        with self._wake:
            if self.death is not None:
                raise EngineDead(f"model thread died: {self.death}")
            self._slots.take()
            handle = Handle()
            detokenizer = Detokenizer(self._tokenizer, self._special_ids)
            stopping = StoppingCriteria(self._eos_ids, request.stop, request.max_new_tokens)
            row = _Row(request, emit, handle, time.perf_counter(), self._slots, detokenizer, stopping, target.device)
            handle.withdraw = lambda: target.withdraw(row)
            target.waiting.append(row)
            self._wake.notify()
        return handle

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        """The model thread. Whatever escapes the loop (lane.fail itself raising, say) ends it for good: without a
        record /health would stay 200 while every request waited forever. Requests still held fail at once."""
        try:
            self._loop()
        except BaseException as exc:
            self.death = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            log.critical("model thread died: %s", self.death, exc_info=True)
            with self._wake:  # after `death` is set, so a submit either sees it or is among the orphans
                rows = [row for lane in self.lanes.values() for row in lane.orphans()]
            for row in rows:
                with contextlib.suppress(Exception):  # an emit that raises again is past helping
                    row.fail(EngineDead(f"model thread died: {self.death}"))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not any(lane.busy for lane in self.lanes.values()):
                    self._wake.wait()
                if self._closed:
                    return
            for lane in self.lanes.values():
                try:
                    batch = lane.turn()
                    if batch and self.on_step:
                        self.on_step(lane.name, batch, len(lane.waiting))
                except Exception as exc:  # a failed forward fails that batch, never the server
                    lane.fail(exc)
