"""The KV cache of a lane: one preallocated slab per layer, rows left-aligned, each row written at its own columns.

Per layer, keys and values are (slots, H, capacity, D). A request owns one slot; its token at position p lives in
column p, so a row never moves when others join or leave (no concatenating, no re-padding), and its position ids are
its column numbers. A forward names the slots it runs and, per row, the first column its input ids go to; the view
below writes the new K/V there and gives attention the slots' columns [0, width), with an additive mask that lets
the query at column c see exactly columns 0..c of its own row. Columns past a row's length hold zeros or junk from
padded queries; the mask gives them weight exp(-huge) = 0, and they are finite, so 0 x value adds nothing.

The columns grow by doubling (a copy per growth, so O(log S) allocations per burst, none per step) and the slab is
dropped when its lane goes idle, so memory is held only while serving. With a budget (`max_tokens`, from
server.engine.kv_budget) the slab never holds more than `max_tokens` positions: rows x columns <= max_tokens, the
rows being the slots it can hold at that width (a copy whenever the rows or columns change). Each slot in use
records its `bound`, the most columns its request can reach (prompt + max_new_tokens); the caller admits a newcomer
only if the slots in use times the longest bound still fit (`fits`), so every forward's columns fit the budget. The
budget's bytes are max_tokens x layers x 2 x H x D x the slab's element size, plus, while the slab is reshaped, one
layer's old copy (the demo in float32 at 8 x 2048: 755 MB for its 30 layers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from server.engine.attention import kv_dtype, slab_sdpa, wants_bool_mask
from server.engine.decoder import run_stack
from server.engine.kernels import small_rows_scope
from server.load.adapters import BootError

_MIN_CAPACITY = 256


def refuse_sliding_window(model: nn.Module, max_total_tokens: int) -> None:
    """The slab's mask is full causal attention. A model with sliding-window layers attends only to the last `window`
    keys there, so past `window` tokens its logits would differ from ours: refuse unless no request can get there."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    slides = "sliding_attention" in layer_types or (not layer_types and getattr(config, "use_sliding_window", True))
    if window and slides and window < max_total_tokens:
        raise BootError(
            f"the model attends over a sliding window of {window} tokens, and the torch engine's KV cache serves full "
            f"attention only; with limits.max_total_tokens {max_total_tokens} a request could outgrow the window",
            f"set limits.max_total_tokens to {window} or less, or serve with engine.kind: vllm",
            "limits.max_total_tokens",
        )


def _length_dependent_rope(model: nn.Module) -> tuple[str, int] | None:
    """(rope type, positions up to which its frequencies stay fixed) of the first rotary embedding whose frequencies
    depend on the forward's length, or None. transformers recomputes `dynamic` frequencies once a forward's largest
    position passes the cached length (max_position_embeddings at first), and switches `longrope` to its long factors
    past original_max_position_embeddings."""
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        for kind in kinds.values() if isinstance(kinds, dict) else [kinds]:
            if not isinstance(kind, str) or not ("dynamic" in kind or kind == "longrope"):
                continue
            params = getattr(getattr(module, "config", None), "rope_parameters", None) or {}
            fixed: Any = params.get("original_max_position_embeddings") if kind == "longrope" else None
            return kind, int(fixed or getattr(module, "original_max_seq_len", 0))
    return None


def refuse_length_dependent_rope(model: nn.Module, max_total_tokens: int) -> None:
    """A batched or chunked forward holds many requests' positions at once, so a rotary embedding whose frequencies
    follow the forward's largest position would rotate each request by another one's length: refuse unless no
    request can pass the length where they change."""
    found = _length_dependent_rope(model)
    if found is not None and found[1] < max_total_tokens:
        kind, fixed = found
        raise BootError(
            f"the model's rotary embedding (rope_type {kind}) changes its frequencies with the length of the forward "
            f"past {fixed} positions, and the torch engine batches requests of different lengths in one forward; "
            f"with limits.max_total_tokens {max_total_tokens} a request could get another's frequencies",
            f"set limits.max_total_tokens to {fixed} or less",
            "limits.max_total_tokens",
        )


class KVBudgetExceeded(RuntimeError):
    """A forward would need more columns than the slab's budget allows for its rows in use (admission prevents it)."""


class KVSlab:
    """Per-layer K/V storage for `slots` rows and each row's length (the columns it has cached).

    `max_tokens`: the most positions (rows x columns) it may hold, None for no limit; `dtype`: what it stores K/V
    in, None for the dtype of the first states written."""

    def __init__(self, slots: int, max_tokens: int | None = None, dtype: torch.dtype | None = None) -> None:
        self.slots, self.max_tokens, self.dtype = slots, max_tokens, dtype
        self.keys: list[torch.Tensor] = []  # per layer (rows, H, capacity, D)
        self.values: list[torch.Tensor] = []
        self.rows = 0  # slots allocated: all of them without a budget, as many as fit the columns with one
        self.capacity = 0
        self.lengths = [0] * slots
        self.bounds = [0] * slots  # per slot in use, the most columns its row can reach; 0: free

    @property
    def live(self) -> int:
        """Slots up to the last one in use (the rows a reshape must keep)."""
        return max((slot + 1 for slot, bound in enumerate(self.bounds) if bound), default=0)

    def column_limit(self) -> int | float:
        """The most columns the budget allows the slots in use."""
        return math.inf if self.max_tokens is None else self.max_tokens // max(self.live, 1)

    def fits(self, slot: int, bound: int) -> bool:
        """Whether `slot` can take a request reaching `bound` columns with the slots in use keeping theirs."""
        if self.max_tokens is None:
            return True
        return max(self.live, slot + 1) * max(*self.bounds, bound) <= self.max_tokens

    def take(self, slot: int, bound: int) -> None:
        self.bounds[slot], self.lengths[slot] = bound, 0

    def free(self, slot: int) -> None:
        self.bounds[slot], self.lengths[slot] = 0, 0

    @torch.inference_mode()  # the slab's tensors are inference tensors: only changed in that mode
    def reserve(self, width: int) -> None:
        """Make room for `width` columns in every slot in use; existing layers are copied into the new shape."""
        live = self.live
        if width <= self.capacity and live <= self.rows:
            return
        limit = self.column_limit()
        if width > limit:
            raise KVBudgetExceeded(f"{width} columns for {live} slots exceed the KV budget of {self.max_tokens} tokens")
        capacity = max(width, 2 * self.capacity, _MIN_CAPACITY) if width > self.capacity else self.capacity
        capacity = int(min(capacity, limit))
        rows = self.slots if self.max_tokens is None else min(self.slots, self.max_tokens // capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(rows, old.shape[1], capacity, old.shape[3])
                kept_rows, kept = min(rows, old.shape[0]), min(capacity, old.shape[2])
                new[:kept_rows, :, :kept] = old[:kept_rows, :, :kept]
                store[i] = new
        self.rows, self.capacity = rows, capacity

    def layer(
        self, index: int, like: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s K and V, allocated on first use from the shape of its new states `like` (n, H, C, D), in
        the slab's dtype, else `dtype`, else like's."""
        while len(self.keys) <= index:  # layers are written in order, so this allocates exactly `index`
            shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
            stored = self.dtype or dtype or like.dtype
            self.keys.append(like.new_zeros(shape, dtype=stored))
            self.values.append(like.new_zeros(shape, dtype=stored))
        return self.keys[index], self.values[index]

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Copy slot src's cached columns and bound into slot dst (dst's old contents are dropped)."""
        length = self.lengths[src]
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[dst, :, :length] = tensor[src, :, :length]
        self.lengths[dst], self.bounds[dst] = length, self.bounds[src]

    @torch.inference_mode()
    def swap(self, a: int, b: int) -> None:
        la, lb = self.lengths[a], self.lengths[b]
        width = max(la, lb)
        for store in (self.keys, self.values):
            for tensor in store:
                held = tensor[a, :, :width].clone()
                tensor[a, :, :width] = tensor[b, :, :width]
                tensor[b, :, :width] = held
        self.lengths[a], self.lengths[b] = lb, la
        self.bounds[a], self.bounds[b] = self.bounds[b], self.bounds[a]

    def release(self) -> None:
        """Free the storage (the lane is idle); the next forward allocates it again."""
        self.keys, self.values, self.capacity, self.rows = [], [], 0, 0
        self.lengths, self.bounds = [0] * self.slots, [0] * self.slots

    @property
    def nbytes(self) -> int:
        """Bytes the slab holds now."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class SlabView(Cache):
    """The cache one forward sees: slots `rows` of the slab, new K/V written at `columns` (n, C), read up to `width`.

    `rows` is a slice when the slots are contiguous (the running batch: attention reads the slab in place) or an
    index tensor (rows being prefilled, wherever their slots are: one gather per layer, small next to a prefill).
    """

    def __init__(
        self,
        slab: KVSlab,
        rows: slice | torch.Tensor,
        columns: torch.Tensor,
        width: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(layers=[])
        self.slab, self.rows, self.columns, self.width, self.dtype = slab, rows, columns, width, dtype
        first = rows.start if isinstance(rows, slice) else 0
        index = torch.arange(first, rows.stop) if isinstance(rows, slice) else rows
        self.row_index = index.to(columns.device)[:, None]  # (n, 1), broadcast against columns (n, C)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value_states: (n, H, C, D) -> the rows' keys and values (n, H, width, D), new states included."""
        keys, values = self.slab.layer(layer_idx, key_states, self.dtype)
        row_index, columns, rows = self.row_index, self.columns, self.rows
        if columns.device != keys.device:  # a model split over devices (device_map): each layer indexes its own
            row_index, columns = row_index.to(keys.device), columns.to(keys.device)
            rows = rows if isinstance(rows, slice) else rows.to(keys.device)
        # Advanced indices on dims 0 and 2 put their broadcast shape (n, C) first: the target is (n, C, H, D).
        keys[row_index, :, columns] = key_states.transpose(1, 2).to(keys.dtype)
        values[row_index, :, columns] = value_states.transpose(1, 2).to(values.dtype)
        if isinstance(rows, slice):
            return keys[rows, :, : self.width], values[rows, :, : self.width]
        return keys[:, :, : self.width].index_select(0, rows), values[:, :, : self.width].index_select(0, rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width, 0


def causal_mask(columns: torch.Tensor, width: int, dtype: torch.dtype | None) -> torch.Tensor:
    """columns: (n, C), each query's column -> mask (n, 1, C, width): True / 0 where key column <= query column.

    Boolean (dtype None) for `slab_attention`; otherwise additive, in the model's dtype, so eager attention reads it
    too; finfo.min rather than -inf keeps a softmax finite even for a row with every key masked (never the case here:
    a query always sees itself).
    """
    keys = torch.arange(width, device=columns.device)  # (width,)
    allowed = keys[None, None, :] <= columns[:, :, None]  # (n, C, width)
    if dtype is None:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=columns.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@torch.inference_mode()
def forward(
    model: nn.Module,
    slab: KVSlab,
    rows: slice | torch.Tensor,
    ids: torch.Tensor,
    starts: list[int],
    last: list[int],
    stack: Any | None = None,
) -> torch.Tensor:
    """ids: (n, C), row i's tokens for columns starts[i] .. starts[i] + C - 1 (right-padded: only its first
    last[i] + 1 are real) -> logits (n, V) at each row's query last[i]. The caller updates the slab's lengths.

    `stack`: `server.engine.decoder.direct_stack(model)` to run the layers directly (slab attention only), or None
    for transformers' forward."""
    device = ids.device
    columns = torch.tensor(starts, device=device)[:, None] + torch.arange(ids.shape[1], device=device)  # (n, C)
    width = max(starts) + ids.shape[1]
    slab.reserve(width)
    boolean = wants_bool_mask(model)
    mask = causal_mask(columns, width, None if boolean else next(model.parameters()).dtype)
    keep = sorted(set(last))
    # Only the queries whose next token is wanted reach the vocabulary projection: for a prefill chunk that is one
    # position per row, not C (at C = 128 and a 49k vocabulary, 25 MB of logits per row otherwise).
    keep_arg: int | torch.Tensor = 1 if keep == [ids.shape[1] - 1] else torch.tensor(keep, device=device)
    view = SlabView(slab, rows, columns, width, kv_dtype(model))

    def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        return slab_sdpa(query, keys, values, mask, scale).transpose(1, 2)  # (n, C, H, D), as slab_attention's

    with small_rows_scope(model, ids.numel()):
        if stack is not None and boolean:  # eager attention reads the additive mask: transformers' forward
            logits = run_stack(stack, ids, columns, view, attend, keep_arg)  # (n, K, V), K = len(keep)
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=columns, past_key_values=view,
                           use_cache=True, logits_to_keep=keep_arg).logits  # fmt: skip
    pick = torch.tensor([keep.index(q) for q in last], device=logits.device)
    return logits[torch.arange(len(last), device=logits.device), pick]  # (n, V)
