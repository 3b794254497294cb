"""The running batch: rows that decode together, their KV cache and their attention mask (TGI's `Batch`).

Rows join with `concatenate` (left padding aligns them on the right, where the next token goes) and leave with
`filter` (padding columns no kept row needs are trimmed). A padded row attends to exactly the keys it would see
alone, since the mask hides the padding and its position ids skip it, so its logits do not depend on what else is
in the batch, up to float rounding in the attention sums.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

R = TypeVar("R")


@torch.inference_mode()
def prefill(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """input_ids: (1, T) -> next-token logits (1, V) and the filled cache."""
    cache = DynamicCache()
    # logits_to_keep=1: the vocabulary projection for every prompt position would be wasted work.
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], cache


@torch.inference_mode()
def decode_one_token(
    model: nn.Module, tokens: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """tokens: (B, 1), mask: (B, S + 1) with 0 on left padding -> logits (B, V); the cache grows by one position."""
    if mask is None:
        return model(input_ids=tokens, past_key_values=cache, use_cache=True).logits[:, -1, :]
    positions = mask.sum(dim=-1, keepdim=True) - 1  # (B, 1): padding does not count as a position
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
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


class Batch(Generic[R]):
    """Rows in cache order, with their DynamicCache (per layer K/V: (B, H, S, D)) and attention mask (B, S).

    The mask lives on the CPU (it is small, and trimming it needs a host sync anyway) and goes to the model's
    device once per step. `rows` is replaced, never changed in place, so a thread reading it sees a whole list.
    """

    def __init__(self, rows: list[R], cache: DynamicCache, mask: torch.Tensor) -> None:
        self.rows, self.cache, self.mask = rows, cache, mask

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(cls, model: nn.Module, row: R, input_ids: torch.Tensor) -> tuple[torch.Tensor, Batch[R]]:
        """input_ids: (1, T) -> next-token logits (1, V) and a one-row batch holding the prompt's cache.

        The mask has one column per CACHED position, `cache.get_seq_length()` (T), never the id count: the token
        sampled from these logits is not in the cache until the next step feeds it. A mask built from prompt +
        first token is one column too long, and since position ids are the mask's sum minus one, every later
        position would be shifted by one (a wrong rotary angle on every decoded token).
        """
        logits, cache = prefill(model, input_ids)
        mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long)  # (1, T)
        return logits, cls([row], cache, mask)

    def step(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, 1), each row's last sampled token, in row order -> logits (B, V); every row grows by one."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (B, S + 1)
        return decode_one_token(model, tokens, self.cache, self.mask.to(tokens.device))

    def concatenate(self, other: Batch[R]) -> None:
        """Append other's rows after ours (in place; `other` is used up): both are left-padded to the wider S."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self._left_pad(width)
        other._left_pad(width)
        for la, lb in zip(_kv_layers(self.cache), _kv_layers(other.cache), strict=True):
            assert la.keys is not None and lb.keys is not None and la.values is not None and lb.values is not None
            la.keys, la.values = torch.cat([la.keys, lb.keys]), torch.cat([la.values, lb.values])  # (B + B', ...)
        self.mask = torch.cat([self.mask, other.mask])  # (B + B', S)
        self.rows = [*self.rows, *other.rows]

    def filter(self, keep: list[int]) -> None:
        """Keep the rows at `keep` (a non-empty list of indices, in order), then drop the leading columns that are
        padding in every kept row, so a long row that left no longer costs the others attention over its length."""
        index = torch.tensor(keep, dtype=torch.long)
        mask = self.mask[index]  # (B', S)
        start = int((mask.cumsum(dim=1) == 0).all(dim=0).sum().item())  # columns that are padding in every row
        for layer in _kv_layers(self.cache):
            assert layer.keys is not None and layer.values is not None
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]  # (B', H, S - start, D)
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self.mask = mask[:, start:]  # (B', S - start)
        self.rows = [self.rows[i] for i in keep]

    def _left_pad(self, width: int) -> None:
        """Pad every layer's keys/values (B, H, S, D) and the mask (B, S) with zeros on the left to S = width."""
        extra = width - self.mask.shape[1]
        if extra <= 0:
            return
        for layer in _kv_layers(self.cache):
            k, v = layer.keys, layer.values
            assert k is not None and v is not None
            layer.keys = torch.cat([k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3]), k], dim=2)
            layer.values = torch.cat([v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3]), v], dim=2)
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], dim=1)
