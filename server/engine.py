"""The serving engine: one model (merged, or PEFT with adapters on the side), one request at a time.

Decoding is split as in gpt-fast: `prefill` runs the prompt once and returns the KV cache, `decode_one_token` extends
it by one token, and `Engine.stream` strings them together with TGI's stopping rules. Requests are serialised by a
lock; the time spent waiting for it is the request's queue time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from server.config import LimitsConfig
from server.parity import ParityResult
from server.sampling import SamplingParams, TokenChooser

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    weight: float
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]


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


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation: tokenized, with its limits resolved."""

    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Generation:
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int | None = None
    prompt_tokens: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0


@torch.inference_mode()
def prefill(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """input_ids: (1, T) -> next-token logits (1, V) and the filled cache."""
    cache = DynamicCache()
    # logits_to_keep=1: the vocabulary projection for every prompt position would be wasted work.
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], cache


@torch.inference_mode()
def decode_one_token(model: nn.Module, token: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """token: (1, 1) -> next-token logits (1, V); the cache grows by one position."""
    out = model(input_ids=token, cache=cache, use_cache=True)
    return out.logits[:, -1, :]


class Engine:
    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, info: EngineInfo, limits: LimitsConfig
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.limits = limits
        self.device = next(model.parameters()).device
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return self.info.mode

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model, "generation_config", None)):
            value: Any = getattr(source, "eos_token_id", source)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def _token_text(self, ids: list[int]) -> str:
        """The text the last id adds, decoded in context so multi-byte characters and spaces come out right."""
        before = self.decode(ids[:-1], skip_special_tokens=False)
        return self.decode(ids, skip_special_tokens=False)[len(before) :]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def stream(self, request: PreparedRequest) -> Iterator[tuple[Token, Generation]]:
        """Yield each generated token with the generation so far; the last one carries `finish_reason`."""
        queued = time.perf_counter()
        with self._lock:
            started = time.perf_counter()
            chooser = TokenChooser(request.params)
            gen = Generation(seed=chooser.seed, prompt_tokens=len(request.input_ids), queue_seconds=started - queued)
            all_ids = torch.tensor([request.input_ids], dtype=torch.long)  # (1, T)
            logits, cache = prefill(self.model, all_ids.to(self.device))
            generated: list[int] = []
            window = max((len(s) for s in request.stop), default=0)
            while True:
                token_id, logprob = chooser.choose(all_ids, logits)  # type: ignore[arg-type]
                generated.append(token_id)
                all_ids = torch.cat([all_ids, torch.tensor([[token_id]])], dim=1)  # (1, T + n)
                special = token_id in self.tokenizer.all_special_ids
                token = Token(token_id, self._token_text(generated), logprob, special)
                gen.tokens.append(token)
                gen.text += "" if special else token.text
                if token_id in self.eos_ids:
                    gen.finish_reason = "eos_token"
                elif request.stop and any(s in gen.text[-(window + len(token.text)) :] for s in request.stop):
                    # A stop string may end inside a token, so look at the tail that this token could complete.
                    gen.finish_reason = "stop_sequence"
                elif len(generated) >= request.max_new_tokens:
                    gen.finish_reason = "length"
                gen.inference_seconds = time.perf_counter() - started
                yield token, gen
                if gen.finish_reason is not None:
                    return
                logits = decode_one_token(self.model, torch.tensor([[token_id]], device=self.device), cache)

    def generate(self, request: PreparedRequest) -> Generation:
        gen = Generation()
        for _, step in self.stream(request):
            gen = step
        gen.text = self.decode([t.id for t in gen.tokens])
        return gen

    def warmup(self) -> Generation:
        """One short greedy generation, so the first user request does not pay for lazy initialisation."""
        ids = self.tokenize("Hello")
        return self.generate(PreparedRequest(input_ids=ids, params=SamplingParams(), max_new_tokens=4))
