"""Iteration-level batching: requests join the running batch at step boundaries and leave as soon as they finish.

One thread owns the model. Each loop turn it admits waiting requests (each prefilled alone, then spliced into the
batch's KV cache with left padding), runs one decode step for the whole batch, and hands every row its token.
Rows that finish or whose client went away are dropped before the next step, and padding columns that no row needs
any more are trimmed, so a long request never holds short ones back.

Numerics: a padded row attends to exactly the same keys as it would alone (padding is masked out), and each request
samples from its own seeded generator, so its output does not depend on what else is in the batch, up to float
rounding in the attention sums.
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

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from server.engine.sampling import TokenChooser
from server.engine.types import Generation, PreparedRequest, TextStream, Token

log = logging.getLogger("mergeserve.scheduler")
Emit = Callable[[Token | BaseException, Generation], None]


class Overloaded(Exception):
    """More requests than max_concurrent_requests: TGI answers 429 "Model is overloaded"."""


class EngineDead(RuntimeError):
    """The model thread died: nothing submitted will ever run, so requests fail at once instead of waiting."""


@dataclass
class Handle:
    """The caller's side of a submitted request; `cancel()` frees its batch slot within one decode step.

    A request still waiting in the queue is withdrawn at once, so its max_concurrent_requests slot is free for the
    next submission, not only when the scheduler would next have admitted it (which, with a full batch, is when a
    running request finishes: up to max_new_tokens steps later).
    """

    cancelled: threading.Event = field(default_factory=threading.Event)
    withdraw: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        self.cancelled.set()
        self.withdraw()


class _Slots:
    """Unfinished requests, counted against max_concurrent_requests.

    A request gives its slot back before its last token is emitted, so a client that sends its next request as soon
    as it has an answer never finds its own finished request still counted.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.lock = threading.Lock()

    def take(self) -> None:
        with self.lock:
            if self.used >= self.limit:
                raise Overloaded("Model is overloaded")
            self.used += 1

    def give_back(self) -> None:
        with self.lock:
            self.used -= 1


@dataclass(eq=False)  # rows are compared by identity: each is one request
class _Row:
    request: PreparedRequest
    emit: Emit
    handle: Handle
    submitted: float
    slots: _Slots
    text_stream: TextStream
    device: torch.device  # the lane's: the penalties index the logits with all_ids, so both must live there
    admitted: float = 0.0
    released: bool = False
    chooser: TokenChooser = field(init=False)
    all_ids: torch.Tensor = field(init=False)  # (1, T + generated): what repetition penalties look at
    gen: Generation = field(init=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots.give_back()

    def __post_init__(self) -> None:
        self.chooser = TokenChooser(self.request.params)
        self.all_ids = torch.tensor([self.request.input_ids], dtype=torch.long, device=self.device)
        self.gen = Generation(seed=self.chooser.seed, prompt_tokens=len(self.request.input_ids))


@torch.inference_mode()
def prefill(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """input_ids: (1, T) -> next-token logits (1, V) and the filled cache."""
    cache = DynamicCache()
    # logits_to_keep=1: the vocabulary projection for every prompt position would be wasted work.
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], cache


@torch.inference_mode()
def decode_one_token(
    model: nn.Module, tokens: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """tokens: (B, 1), mask: (B, S + 1) with 0 on left padding -> logits (B, V); the cache grows by one position."""
    if mask is None:
        return model(input_ids=tokens, cache=cache, use_cache=True).logits[:, -1, :]
    positions = mask.sum(dim=-1, keepdim=True) - 1  # (B, 1): padding does not count as a position
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.logits[:, -1, :]


def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The per-layer K/V tensors, (B, H, S, D) each; only full-attention layers can be re-aligned by padding."""
    layers = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise NotImplementedError(
                f"batching needs full-attention KV caches, not {type(layer).__name__}; set limits.max_batch_size: 1"
            )
        layers.append(layer)
    return layers


def _left_pad(cache: DynamicCache, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pad every layer's keys/values (B, H, S, D) and the mask (B, S) on the left to length `width`."""
    extra = width - mask.shape[1]
    if extra <= 0:
        return mask
    for layer in _kv_layers(cache):
        k, v = layer.keys, layer.values
        assert k is not None and v is not None
        layer.keys = torch.cat([k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3]), k], dim=2)
        layer.values = torch.cat([v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3]), v], dim=2)
    return torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)


def _join(a: DynamicCache, a_mask: torch.Tensor, b: DynamicCache, b_mask: torch.Tensor) -> torch.Tensor:
    """Append b's rows to a (in place on a); returns the joined mask."""
    width = max(a_mask.shape[1], b_mask.shape[1])
    a_mask, b_mask = _left_pad(a, a_mask, width), _left_pad(b, b_mask, width)
    for la, lb in zip(_kv_layers(a), _kv_layers(b), strict=True):
        assert la.keys is not None and lb.keys is not None and la.values is not None and lb.values is not None
        la.keys, la.values = torch.cat([la.keys, lb.keys]), torch.cat([la.values, lb.values])
    return torch.cat([a_mask, b_mask])


def _keep(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep `rows`, then drop leading columns that are padding in every kept row."""
    index = torch.tensor(rows, dtype=torch.long)
    mask = mask[index]
    start = int((mask.cumsum(dim=1) == 0).all(dim=0).sum().item())
    for layer in _kv_layers(cache):
        assert layer.keys is not None and layer.values is not None
        layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
        layer.values = layer.values[index.to(layer.values.device), :, start:]
    return mask[:, start:]


class _Decoder:
    """TGI's per-token rules: choose, detokenize, and decide whether the request is finished."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.special = set(tokenizer.all_special_ids)

    def advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Choose the row's next token and emit it; True when the row is done (finished or cancelled)."""
        if row.handle.cancelled.is_set():
            row.release()
            return True
        token_id, logprob = row.chooser.choose(row.all_ids, logits)  # type: ignore[arg-type]
        row.all_ids = torch.cat([row.all_ids, row.all_ids.new_tensor([[token_id]])], dim=1)
        gen, request = row.gen, row.request
        special = token_id in self.special
        token = Token(token_id, row.text_stream.push(token_id), logprob, special)
        gen.tokens.append(token)
        gen.text += "" if special else token.text
        window = max((len(s) for s in request.stop), default=0) + len(token.text)
        if token_id in self.eos_ids:
            gen.finish_reason = "eos_token"
        elif request.stop and any(s in gen.text[-window:] for s in request.stop):
            # A stop string may end inside a token, so look at the tail that this token could complete.
            gen.finish_reason = "stop_sequence"
        elif len(gen.tokens) >= request.max_new_tokens:
            gen.finish_reason = "length"
        now = time.perf_counter()
        gen.inference_seconds = now - row.admitted
        if gen.first_token_seconds is None:
            gen.first_token_seconds = now - row.submitted
        if gen.finish_reason is not None:
            row.release()
        # A snapshot: the reader runs on the event loop, maybe several steps behind this thread, and must see the
        # text and finish_reason as of this token, or it would end the stream early and drop the tokens between.
        # The token list is shared (it is only appended to), so it is complete in the final snapshot.
        row.emit(token, copy.copy(gen))
        return gen.finish_reason is not None


def _fail_row(row: _Row, exc: BaseException) -> None:
    log.warning("request failed alone: %s: %s", type(exc).__name__, exc)
    row.release()
    row.emit(exc, row.gen)


class _Lane:
    """One model's running batch. Lanes never share a batch, so an A/B process never mixes arms in a forward."""

    def __init__(self, name: str, model: nn.Module, decoder: _Decoder, lock: threading.Condition) -> None:
        self.name, self.model, self.decoder, self.lock = name, model, decoder, lock
        self.device = next(model.parameters()).device
        self.waiting: deque[_Row] = deque()
        self.rows: list[_Row] = []
        self.admitting: _Row | None = None  # being prefilled: neither waiting nor in the batch, but still counted
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    @property
    def load(self) -> tuple[int, int]:
        return len(self.rows) + (self.admitting is not None), len(self.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    def withdraw(self, row: _Row) -> None:
        """Drop a cancelled row that is still queued; once admission has popped it, the scheduler releases it."""
        with self.lock:
            if row in self.waiting:
                self.waiting.remove(row)
                row.release()

    def admit(self, max_batch_size: int) -> None:
        while True:
            with self.lock:
                if not self.waiting or len(self.rows) >= max_batch_size:
                    return
                row = self.admitting = self.waiting.popleft()
            if row.handle.cancelled.is_set():
                row.release()
            else:
                self._prefill_and_join(row)
            with self.lock:
                self.admitting = None

    def _prefill_and_join(self, row: _Row) -> None:
        row.admitted = time.perf_counter()
        row.gen.queue_seconds = row.admitted - row.submitted
        try:
            logits, cache = prefill(self.model, row.all_ids.to(self.device))
            done = self.decoder.advance(row, logits)
        except Exception as exc:  # the prefill ran alone: only this request fails, the batch goes on
            _fail_row(row, exc)
            return
        if done:
            return  # done after one token
        # One column per cached position. all_ids already holds the first sampled token, which is not in the cache
        # yet: a mask built from it is one column too long and shifts every later position by one.
        mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            self.mask = _join(self.cache, self.mask, cache, mask)
        with self.lock:
            self.rows.append(row)

    def step(self) -> int:
        """One decode step for every row; returns the batch size."""
        assert self.cache is not None
        tokens = torch.cat([row.all_ids[:, -1:] for row in self.rows])  # (B, 1), on the device without a sync per row
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (B, S + 1)
        logits = decode_one_token(self.model, tokens, self.cache, self.mask.to(self.device))  # (B, V)
        keep = [i for i, row in enumerate(self.rows) if not self._advance(row, logits[i : i + 1])]
        if len(keep) < len(self.rows):
            self.mask = _keep(self.cache, self.mask, keep) if keep else self.mask[:0, :0]
            with self.lock:
                self.rows = [self.rows[i] for i in keep]
            if not keep:
                self.cache = None
        return len(tokens)

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Choose one row's token; a failure there (its own sampling) fails that row alone."""
        try:
            return self.decoder.advance(row, logits)
        except Exception as exc:
            _fail_row(row, exc)
            return True

    def orphans(self) -> list[_Row]:
        """Every request this lane holds, taken out of it, to fail them all when the model thread dies."""
        rows = [*self.waiting, *self.rows, *([self.admitting] if self.admitting else [])]
        self.waiting, self.rows, self.admitting, self.cache = deque(), [], None, None
        return rows

    def fail(self, exc: BaseException) -> None:
        failed = self.rows + ([self.admitting] if self.admitting else [])
        log.exception("lane %s: decode failed; failing %d requests", self.name, len(failed))
        for row in failed:
            row.release()
            row.emit(exc, row.gen)
        with self.lock:
            self.rows, self.admitting = [], None
        self.cache = None


class Scheduler:
    """Owns the model thread. With several lanes (A/B arms) it gives each busy lane one step per turn, in turn."""

    def __init__(
        self,
        models: dict[str, nn.Module],
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        max_batch_size: int,
        max_concurrent_requests: int,
        on_step: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self._slots = _Slots(max_concurrent_requests)
        self.on_step = on_step  # (lane, batch size, queue size) after each decode step, for metrics
        self._wake = threading.Condition()
        self._tokenizer = tokenizer
        decoder = _Decoder(tokenizer, eos_ids)
        self.lanes = {name: _Lane(name, model, decoder, self._wake) for name, model in models.items()}
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
        target = self.lanes[lane] if lane is not None else next(iter(self.lanes.values()))
        with self._wake:
            if self.death is not None:
                raise EngineDead(f"model thread died: {self.death}")
            self._slots.take()
            handle = Handle()
            row = _Row(
                request, emit, handle, time.perf_counter(), self._slots, TextStream(self._tokenizer), target.device
            )
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
                row.release()
                with contextlib.suppress(Exception):  # an emit that raises again is past helping
                    row.emit(EngineDead(f"model thread died: {self.death}"), row.gen)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not any(lane.busy for lane in self.lanes.values()):
                    self._wake.wait()
                if self._closed:
                    return
            for lane in self.lanes.values():
                try:
                    lane.admit(self.max_batch_size)
                    if lane.rows:
                        batch = lane.step()
                        if self.on_step:
                            self.on_step(lane.name, batch, len(lane.waiting))
                except Exception as exc:  # a failed forward fails that batch, never the server
                    lane.fail(exc)
