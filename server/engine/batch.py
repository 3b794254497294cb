"""The running batch of a lane (TGI's `Batch`): rows decoding together, rows being prefilled, and their KV slab.

Slots: the running rows hold slots 0..B-1 in row order, so a decode step reads the slab in place; rows being
prefilled hold slots from B up. A row that leaves gives its slot to the last running row (one copy of that row's
columns), and a row whose prompt is done takes slot B, so neither ever re-pads or concatenates anyone's cache.

Prefill is chunked and batched: each call of `prefill` runs one forward of at most `budget` tokens (rows x padded
chunk width), shortest remaining prompt first, but a row left out of STARVED forwards in a row goes first, so a steady
stream of short prompts cannot starve a long one. Newcomers that arrive together share a forward, and a long prompt
goes in chunks of `budget` tokens between decode steps, so a short request waits for a few chunks at most, never for
the long prompt's whole prefill. Every chunk has at least one token: its logits are read at its last one.

Numerics: a row's queries see exactly its own columns (kv_slab's mask), with its own positions, so its logits do not
depend on what else is in the batch, up to float rounding in the attention sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from server.engine.decoder import direct_stack
from server.engine.fused_decode import decode_step, fusable
from server.engine.kv_budget import KVBudget
from server.engine.kv_slab import KVBudgetExceeded, KVSlab, forward
from server.engine.mixed import Chunk, mixed_forward
from server.engine.prefix_cache import PrefixCache

R = TypeVar("R")
# Prefill forwards a row may be left out of before it goes first (Batch.next_chunks): each forward it waits costs at
# most one chunk of `budget` tokens (~0.1-0.2 s on 2 cores at the default budget), so under a steady stream of short
# prompts a long one gets a chunk every STARVED + 1 forwards (~1 s): its prefill takes up to 5x longer than alone,
# and short newcomers still wait behind one of its chunks at most.
STARVED = 4


@dataclass(eq=False)
class Prefilling(Generic[R]):
    """A row whose prompt is (partly) in the cache: `done` of its `ids` are cached in slot `slot`."""

    row: R
    ids: list[int]
    slot: int
    done: int = 0
    passed: int = 0  # prefill forwards in a row that left this row out (see Batch.next_chunks)

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done


def prefill_rows(
    model: nn.Module, slab: KVSlab, chunks: list[tuple[Prefilling[R], int]], stack: Any | None = None
) -> torch.Tensor:
    """One forward over (row, token count) chunks, right-padded to the widest -> logits (n, V) at each chunk's end."""
    width = max(count for _, count in chunks)
    pad = 0  # any id will do: padded queries write junk past the row's length and are never read
    ids = [p.ids[p.done : p.done + count] + [pad] * (width - count) for p, count in chunks]
    device = next(model.parameters()).device
    slots = torch.tensor([p.slot for p, _ in chunks], device=device)
    return forward(model, slab, slots, torch.tensor(ids, device=device), [p.done for p, _ in chunks],
                   [count - 1 for _, count in chunks], stack)  # fmt: skip


def decode_rows(
    model: nn.Module, slab: KVSlab, tokens: torch.Tensor, stack: Any | None = None, fused: Any | None = None
) -> torch.Tensor:
    """tokens: (B, 1), the last sampled token of the rows in slots 0..B-1 -> logits (B, V). `fused`: the fused
    kernels (server.engine.slab_ops) for the direct `stack`, used where they apply."""
    batch = tokens.shape[0]
    if fused is not None and stack is not None:
        logits = decode_step(fused, stack, slab, tokens)
        if logits is not None:
            return logits
    return forward(model, slab, slice(0, batch), tokens, slab.lengths[:batch], [0] * batch, stack)


class Batch(Generic[R]):
    """A lane's rows: `rows` decoding (slots 0..B-1, in order) and `prefilling` (slots from B up).

    `rows` is replaced, never changed in place, so a thread reading it sees a whole list.
    """

    def __init__(
        self, slots: int, budget: int, prefix_tokens: int = 0, ops: Any | None = None, kv: KVBudget | None = None
    ) -> None:
        """`budget`: prefill tokens per forward; `kv`: the slab's memory budget (None: no limit) and the prefix
        cache's dtype (None: the slab's)."""
        if kv is None:
            self.slab = KVSlab(slots)
            self.prefixes = PrefixCache(prefix_tokens)
        else:
            self.slab = KVSlab(slots, kv.tokens, kv.dtype)
            self.prefixes = PrefixCache(prefix_tokens, kv.prefix_dtype)  # recent prompts' K/V for newcomers
        self.budget = budget
        self.rows: list[R] = []
        self.prefilling: list[Prefilling[R]] = []
        self.ops = ops  # the fused decode kernels (server.engine.slab_ops), or None
        self._stack: tuple[nn.Module, Any | None, bool] | None = None  # (model, its direct_stack, fusable)

    def direct(self, model: nn.Module) -> Any | None:
        """`server.engine.decoder.direct_stack(model)`, worked out once per model (it walks every layer)."""
        if self._stack is None or self._stack[0] is not model:
            stack = direct_stack(model)
            self._stack = (model, stack, stack is not None and fusable(stack))
        return self._stack[1]

    def fused(self, model: nn.Module) -> Any | None:
        """The fused kernels if they can run `model`'s decode steps, else None."""
        self.direct(model)
        return self.ops if self._stack is not None and self._stack[2] else None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        """Slots a newcomer can take."""
        return self.slab.slots - len(self.rows) - len(self.prefilling)

    def _next_slot(self) -> int:
        taken = {p.slot for p in self.prefilling}
        return next(s for s in range(len(self.rows), self.slab.slots) if s not in taken)

    def fits(self, bound: int) -> bool:
        """Whether a newcomer reaching `bound` columns (prompt + max_new_tokens) fits the KV budget beside the rows
        held now (the caller checks `free` first); one that does not waits for rows to leave."""
        return self.slab.fits(self._next_slot(), bound)

    def add(self, row: R, ids: list[int], bound: int | None = None) -> None:
        """Queue `row` for prefill in a free slot (the caller checks `free` and `fits`), after the longest cached
        prefix; `bound`: the most columns it can reach (default: its prompt). KVBudgetExceeded if it does not fit."""
        if not ids:  # its chunk would have no last token, and its logits index would be the row before it
            raise ValueError("a prefilling row needs at least one token")
        slot, bound = self._next_slot(), max(bound or 0, len(ids))
        if not self.slab.fits(slot, bound):
            raise KVBudgetExceeded(
                f"a request of {bound} tokens does not fit the KV budget of {self.slab.max_tokens} tokens beside the "
                f"{len(self.rows) + len(self.prefilling)} requests in the batch"
            )
        self.slab.take(slot, bound)
        done = self.prefixes.fill(self.slab, slot, ids)  # columns already computed for an earlier prompt
        self.slab.lengths[slot] = done
        self.prefilling = [*self.prefilling, Prefilling(row, ids, slot, done)]

    def next_chunks(self) -> list[tuple[Prefilling[R], int]]:
        """The next prefill forward: as many rows as fit `budget` once padded, shortest remaining first, except that
        a row left out of `STARVED` forwards in a row goes first (oldest first among those).

        Shortest-first keeps a short newcomer's wait to one chunk of a long prompt; alone it would starve a long
        prompt under a steady stream of short ones. With the age rule a row gets a chunk within STARVED + slots
        forwards whatever arrives, and a short newcomer still waits at most STARVED chunks of a long one.
        """
        stale = [p for p in self.prefilling if p.passed >= STARVED]  # in admission order: oldest first
        fresh = sorted((p for p in self.prefilling if p.passed < STARVED), key=lambda p: p.remaining)
        chunks: list[tuple[Prefilling[R], int]] = []
        columns = self.slab.column_limit()  # padded queries write past a row's end: keep them inside the budget
        for p in [*stale, *fresh]:
            count = min(p.remaining, self.budget)
            width = max([count, *(c for _, c in chunks)])
            end = max([p.done, *(q.done for q, _ in chunks)]) + width
            if chunks and (width * (len(chunks) + 1) > self.budget or end > columns):
                break
            chunks.append((p, count))
        chosen = {id(p) for p, _ in chunks}
        for p in self.prefilling:
            p.passed = 0 if id(p) in chosen else p.passed + 1
        return chunks

    def prefill(self, model: nn.Module, chunks: list[tuple[Prefilling[R], int]]) -> list[tuple[R, torch.Tensor]]:
        """Run the chunks; -> (row, logits (1, V)) for each row whose prompt is now fully cached."""
        return self._cached(chunks, prefill_rows(model, self.slab, chunks, self.direct(model)))

    def mixed(
        self, model: nn.Module, tokens: torch.Tensor, chunks: list[tuple[Prefilling[R], int]]
    ) -> tuple[torch.Tensor, list[tuple[R, torch.Tensor]]]:
        """One forward for a decode step and the chunks (server.engine.mixed); tokens: (B, 1) as for `step` ->
        (the running rows' logits (B, V), (row, logits (1, V)) for each row whose prompt is now fully cached)."""
        batch = len(self.rows)
        parts = [Chunk(p.slot, p.ids[p.done : p.done + count], p.done) for p, count in chunks]
        logits = mixed_forward(model, self.slab, tokens, self.slab.lengths[:batch], parts, self.direct(model))
        for i in range(batch):
            self.slab.lengths[i] += 1
        return logits[:batch], self._cached(chunks, logits[batch:])

    def _cached(self, chunks: list[tuple[Prefilling[R], int]], logits: torch.Tensor) -> list[tuple[R, torch.Tensor]]:
        """Book the chunks as cached; logits (P, V), one per chunk -> the rows whose prompt is now complete."""
        finished = []
        for i, (p, count) in enumerate(chunks):
            p.done += count
            self.slab.lengths[p.slot] = p.done
            if p.remaining == 0:
                self.prefixes.store(self.slab, p.slot, p.ids)
                finished.append((p.row, logits[i : i + 1]))
        return finished

    def drop_prefilling(self, row: R) -> None:
        """Forget a row that leaves before it joins; its slot is free again."""
        for p in self.prefilling:
            if p.row is row:
                self.slab.free(p.slot)
        self.prefilling = [p for p in self.prefilling if p.row is not row]

    def join(self, row: R) -> None:
        """Move a fully prefilled row into the running batch, at slot B."""
        p = next(p for p in self.prefilling if p.row is row)
        target = len(self.rows)
        if p.slot != target:
            other = next((q for q in self.prefilling if q.slot == target), None)
            if other is None:
                self.slab.move(p.slot, target)
                self.slab.free(p.slot)
            else:
                self.slab.swap(p.slot, target)
                other.slot = p.slot
        self.prefilling = [q for q in self.prefilling if q is not p]
        self.rows = [*self.rows, row]

    def step(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, 1), each running row's last sampled token, in row order -> logits (B, V)."""
        logits = decode_rows(model, self.slab, tokens, self.direct(model), self.fused(model))
        for i in range(len(self.rows)):
            self.slab.lengths[i] += 1
        return logits

    def filter(self, keep: list[int]) -> None:
        """Keep the running rows at indices `keep`; each gap is filled by the last running row, so the order of the
        kept rows may change (rows carry their own state; only the slot order has to match `rows`)."""
        rows = list(self.rows)
        for i in sorted(set(range(len(rows))) - set(keep), reverse=True):
            last = len(rows) - 1
            if i != last:
                self.slab.move(last, i)
                rows[i] = rows[last]
            self.slab.free(last)
            rows.pop()
        self.rows = rows

    def clear(self) -> None:
        """Forget every row and free the slab (the lane is idle, or its rows failed)."""
        self.rows, self.prefilling = [], []
        self.slab.release()

    @property
    def idle(self) -> bool:
        return not self.rows and not self.prefilling
