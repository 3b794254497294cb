"""One forward for a lane's decode rows and its prefill chunks together (vLLM's chunked prefill mixed with decodes).

A decode step and a prefill forward each read every weight once; run as one forward they read them once together.
On the 2-core development machine (SmolLM2 bf16) a decode step of 8 rows takes ~36 ms and a 37-token prefill ~55
ms, and with 8 clients in a closed loop prefills were 39 % of the model thread's time (py-spy), one per request:
folding each into the decode step saves most of a step per newcomer.

Layout: the forward's tokens are flattened into one sequence (1, N): the B decode rows' tokens first, one each,
then each of the P prefill chunks right-padded to the widest, C columns (N = B + P x C). Linear layers, norms and
rotary embeddings work per token and do not care; attention is the one place where rows meet, and `MixedPlan.attend`
runs it per group: the decode queries against slots 0..B-1 of the slab in place, the prefill queries against their
slots' columns, gathered. The plan reaches attention as the keyword argument `slab_plan`, which transformers passes
from the model's forward down to every attention call. A model whose code drops it would attend wrongly, so the
forward counts the layers that wrote K/V against the layers that attended through the plan and raises `NotMixable`
when they differ; the scheduler then runs that lane's prefills and decode steps apart.

Numerics: each token is computed from the same inputs as in the separate forwards (its own row's columns, its own
position), so its logits match those up to float rounding; tests check served tokens against a plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from server.engine.attention import kv_dtype, slab_sdpa
from server.engine.decoder import run_stack
from server.engine.kernels import small_rows_scope
from server.engine.kv_slab import KVSlab, causal_mask


class NotMixable(RuntimeError):
    """The model's attention never saw the plan (its code does not pass attention kwargs through)."""


@dataclass(frozen=True)
class Chunk:
    """A prefill chunk: `ids` go to slot `slot` from column `start`."""

    slot: int
    ids: list[int]
    start: int


class MixedPlan:
    """Where each of the forward's N tokens lives in the slab, and the masks attention needs per group."""

    def __init__(self, lengths: list[int], chunks: list[Chunk], device: torch.device) -> None:
        if any(not c.ids for c in chunks):  # `keep` would point at the token before: another row's logits
            raise ValueError("a prefill chunk needs at least one token")
        self.decoding, self.prefilling = len(lengths), len(chunks)
        self.width = max((len(c.ids) for c in chunks), default=0)  # C: every chunk is padded to it
        decode_cols = torch.tensor(lengths, dtype=torch.long, device=device)  # (B,): each row's next column
        starts = torch.tensor([c.start for c in chunks], dtype=torch.long, device=device)
        prefill_cols = starts[:, None] + torch.arange(self.width, device=device)  # (P, C)
        slots = torch.tensor([c.slot for c in chunks], dtype=torch.long, device=device)
        self.columns = torch.cat([decode_cols, prefill_cols.reshape(-1)])  # (N,)
        self.rows = torch.cat([torch.arange(self.decoding, device=device), slots.repeat_interleave(self.width)])
        self.slots = slots
        self.decode_keys = max(lengths, default=-1) + 1  # columns the decode group reads
        self.prefill_keys = max((c.start for c in chunks), default=0) + self.width
        self.decode_mask = causal_mask(decode_cols[:, None], self.decode_keys, None)  # (B, 1, 1, Wd)
        self.prefill_mask = causal_mask(prefill_cols, self.prefill_keys, None)  # (P, 1, C, Wp)
        # The positions whose logits are wanted: every decode token, and each chunk's last real token.
        ends = [self.decoding + i * self.width + len(c.ids) - 1 for i, c in enumerate(chunks)]
        self.keep = torch.tensor([*range(self.decoding), *ends], dtype=torch.long, device=device)
        self.attended = 0

    @property
    def capacity(self) -> int:
        return max(self.decode_keys, self.prefill_keys)

    def attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """query: (1, H, N, D); keys/values: the layer's slab (slots, Hkv, capacity, D) -> (1, N, H, D)."""
        self.attended += 1
        heads, dim = query.shape[1], query.shape[3]
        b, p, c = self.decoding, self.prefilling, self.width
        outs = []
        if b:
            qd = query[0, :, :b].transpose(0, 1)[:, :, None]  # (B, H, 1, D)
            kd, vd = keys[:b, :, : self.decode_keys], values[:b, :, : self.decode_keys]
            outs.append(slab_sdpa(qd, kd, vd, self.decode_mask, scale).reshape(b, heads, dim))  # (B, H, D)
        if p:
            qp = query[0, :, b:].reshape(heads, p, c, dim).transpose(0, 1)  # (P, H, C, D)
            kp = keys[:, :, : self.prefill_keys].index_select(0, self.slots)
            vp = values[:, :, : self.prefill_keys].index_select(0, self.slots)
            op = slab_sdpa(qp, kp, vp, self.prefill_mask, scale)  # (P, H, C, D)
            outs.append(op.transpose(1, 2).reshape(p * c, heads, dim))  # (P x C, H, D)
        return torch.cat(outs)[None]  # (1, N, H, D)


class MixedView(Cache):
    """The cache a mixed forward sees: writes each token's K/V at its (slot, column); hands attention whole layers."""

    def __init__(self, slab: KVSlab, plan: MixedPlan, dtype: torch.dtype | None) -> None:
        super().__init__(layers=[])
        self.slab, self.plan, self.dtype = slab, plan, dtype
        self.updated = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value_states: (1, Hkv, N, D) -> the layer's whole slab (slots, Hkv, capacity, D), new states in."""
        self.updated += 1
        keys, values = self.slab.layer(layer_idx, key_states, self.dtype)
        rows, columns = self.plan.rows.to(keys.device), self.plan.columns.to(keys.device)
        keys[rows, :, columns] = key_states[0].transpose(0, 1).to(keys.dtype)  # (N, Hkv, D)
        values[rows, :, columns] = value_states[0].transpose(0, 1).to(values.dtype)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.plan.capacity

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.plan.capacity, 0


@torch.inference_mode()
def mixed_forward(
    model: nn.Module,
    slab: KVSlab,
    tokens: torch.Tensor,
    lengths: list[int],
    chunks: list[Chunk],
    stack: Any | None = None,
) -> torch.Tensor:
    """tokens: (B, 1), the next token of the rows in slots 0..B-1 (at columns `lengths`), and the prefill `chunks`
    -> logits (B + P, V): the B decode rows', then each chunk's at its last token. The caller updates the lengths.
    `stack` as for `server.engine.kv_slab.forward`."""
    device = tokens.device
    plan = MixedPlan(lengths, chunks, device)
    slab.reserve(plan.capacity)
    padded = [c.ids + [0] * (plan.width - len(c.ids)) for c in chunks]  # padding writes junk past the chunk: unread
    ids = torch.cat([tokens.reshape(-1), torch.tensor(padded, dtype=torch.long, device=device).reshape(-1)])[None]
    view = MixedView(slab, plan, kv_dtype(model))
    # transformers passes a 4-D mask to attention untouched; attention reads the plan's masks instead.
    unused_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    columns = plan.columns[None]  # (1, N): the flattened tokens' positions
    with small_rows_scope(model, ids.shape[1]):
        if stack is not None:
            logits = run_stack(stack, ids, columns, view, plan.attend, plan.keep)
        else:
            logits = model(input_ids=ids, attention_mask=unused_mask, position_ids=columns, past_key_values=view,
                           use_cache=True, logits_to_keep=plan.keep, slab_plan=plan).logits  # fmt: skip
    if view.updated == 0 or plan.attended != view.updated:
        raise NotMixable(f"{view.updated} layers wrote K/V but {plan.attended} attended through the plan")
    return logits[0]  # (B + P, V)
