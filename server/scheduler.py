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

from server.generation import Generation, PreparedRequest, Token
from server.sampling import TokenChooser

log = logging.getLogger("mergeserve.scheduler")
Emit = Callable[[Token | BaseException, Generation], None]


class Overloaded(Exception):
    """More requests than max_concurrent_requests: TGI answers 429 "Model is overloaded"."""


@dataclass
class Handle:
    """The caller's side of a submitted request; `cancel()` frees its batch slot within one decode step."""

    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    request: PreparedRequest
    emit: Emit
    handle: Handle
    submitted: float
    admitted: float = 0.0
    chooser: TokenChooser = field(init=False)
    all_ids: torch.Tensor = field(init=False)  # (1, T + generated): what repetition penalties look at
    gen: Generation = field(init=False)

    def __post_init__(self) -> None:
        self.chooser = TokenChooser(self.request.params)
        self.all_ids = torch.tensor([self.request.input_ids], dtype=torch.long)
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


class Scheduler:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        max_batch_size: int,
        max_concurrent_requests: int,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_concurrent = max_batch_size, max_concurrent_requests
        self.on_step = on_step  # (batch size, queue size) after each decode step, for metrics
        self._special = set(tokenizer.all_special_ids)
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._admitting: _Row | None = None  # being prefilled: neither waiting nor in the batch, but still counted
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mergeserve-scheduler", daemon=True)
        self._thread.start()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self._rows) + (self._admitting is not None), len(self._waiting)

    def submit(self, request: PreparedRequest, emit: Emit) -> Handle:
        """Queue a request; `emit` is called from the scheduler thread with each token, or with an exception."""
        with self._wake:
            if sum(self.load) >= self.max_concurrent:
                raise Overloaded("Model is overloaded")
            handle = Handle()
            self._waiting.append(_Row(request, emit, handle, time.perf_counter()))
            self._wake.notify()
        return handle

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self._admit()
                if self._rows:
                    self._step()
            except Exception as exc:  # a failed forward fails the batch, never the server
                failed = self._rows + ([self._admitting] if self._admitting else [])
                log.exception("decode step failed; failing %d requests", len(failed))
                for row in failed:
                    row.emit(exc, row.gen)
                self._rows, self._cache, self._admitting = [], None, None

    def _next_waiting(self) -> _Row | None:
        with self._wake:
            if self._waiting and len(self._rows) < self.max_batch_size:
                self._admitting = self._waiting.popleft()
                return self._admitting
        return None

    def _admit(self) -> None:
        while (row := self._next_waiting()) is not None:
            if not row.handle.cancelled.is_set():
                self._prefill_and_join(row)
            with self._wake:
                self._admitting = None

    def _prefill_and_join(self, row: _Row) -> None:
        row.admitted = time.perf_counter()
        row.gen.queue_seconds = row.admitted - row.submitted
        logits, cache = prefill(self.model, row.all_ids.to(self.device))
        mask = torch.ones(1, row.all_ids.shape[1], dtype=torch.long)
        if self._advance(row, logits):
            return  # done after one token
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            self._mask = _join(self._cache, self._mask, cache, mask)
        with self._wake:
            self._rows.append(row)

    def _step(self) -> None:
        assert self._cache is not None
        tokens = torch.tensor([[row.all_ids[0, -1].item()] for row in self._rows], device=self.device)  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)  # (B, S + 1)
        logits = decode_one_token(self.model, tokens, self._cache, self._mask.to(self.device))  # (B, V)
        keep = [i for i, row in enumerate(self._rows) if not self._advance(row, logits[i : i + 1])]
        if len(keep) < len(self._rows):
            self._mask = _keep(self._cache, self._mask, keep) if keep else self._mask[:0, :0]
            self._rows = [self._rows[i] for i in keep]
            if not keep:
                self._cache = None
        if self.on_step:
            self.on_step(len(tokens), len(self._waiting))

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Choose the row's next token and emit it; True when the row is done (finished or cancelled)."""
        if row.handle.cancelled.is_set():
            return True
        token_id, logprob = row.chooser.choose(row.all_ids, logits)  # type: ignore[arg-type]
        row.all_ids = torch.cat([row.all_ids, torch.tensor([[token_id]])], dim=1)
        gen, request = row.gen, row.request
        generated = row.all_ids[0, len(request.input_ids) :].tolist()
        special = token_id in self._special
        token = Token(token_id, self._token_text(generated), logprob, special)
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
        row.emit(token, gen)
        return gen.finish_reason is not None

    def _token_text(self, ids: list[int]) -> str:
        """The text the last id adds, decoded in context so multi-byte characters and spaces come out right."""
        before = self.tokenizer.decode(ids[:-1], skip_special_tokens=False)
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))[len(before) :]
