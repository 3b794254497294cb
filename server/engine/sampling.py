"""Next-token choice with TGI's semantics, built from transformers' logits processors.

TGI samples whenever a warper is set (temperature != 1, top_k, top_p < 1, typical_p < 1), even with
`do_sample: false`; greedy decoding is the case with none of them. Each request owns a seeded generator, so its
samples do not depend on what else runs in the process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import cast

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

# A step's best alternatives, most likely first: (token id, logprob) under the same distribution as the chosen token.
Alternatives = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None  # TGI's: penalty x count / length, over prompt and output
    # OpenAI's penalties (the /v1 routes): over the generated tokens only, frequency x count + presence x (count > 0).
    output_frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None

    @property
    def has_warpers(self) -> bool:
        return (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )

    @property
    def sampling(self) -> bool:
        return self.do_sample or self.has_warpers


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI-style frequency penalty as TGI applies it: subtract penalty x (token count / sequence length)."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (B, T), scores: (B, V)
        freq = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.penalty * freq / input_ids.shape[1]  # type: ignore[return-value]


class OutputPenaltiesLogitsProcessor(LogitsProcessor):
    """OpenAI's frequency and presence penalties, as OpenAI documents them and vLLM applies them: counted over the
    generated tokens alone (the first `prompt_tokens` of input_ids are the prompt)."""

    def __init__(self, frequency: float, presence: float, prompt_tokens: int) -> None:
        self.frequency, self.presence, self.prompt_tokens = frequency, presence, prompt_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (B, T + N), scores: (B, V)
        generated = input_ids[:, self.prompt_tokens :]  # (B, N)
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)  # type: ignore[return-value]


def _processors(params: SamplingParams, prompt_tokens: int) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.frequency_penalty:
        procs.append(FrequencyPenaltyLogitsProcessor(params.frequency_penalty))
    if params.output_frequency_penalty or params.presence_penalty:
        frequency, presence = params.output_frequency_penalty or 0.0, params.presence_penalty or 0.0
        procs.append(OutputPenaltiesLogitsProcessor(frequency, presence, prompt_tokens))
    if not params.sampling:
        return procs
    if params.temperature is not None and params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    if params.typical_p is not None and params.typical_p < 1.0:
        procs.append(TypicalLogitsWarper(params.typical_p))
    return procs


class TokenChooser:
    """Picks the next token for one request and reports its log-probability under the processed distribution."""

    def __init__(self, params: SamplingParams, top_logprobs: int = 0, prompt_tokens: int = 0) -> None:
        """prompt_tokens: how many of the ids `choose` is given are the prompt (the output penalties skip them)."""
        self.params = params
        self.top_logprobs = top_logprobs  # alternatives reported per step; 0 skips the top-k entirely
        self.processors = _processors(params, prompt_tokens)
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if params.sampling:
            self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self.generator = torch.Generator().manual_seed(self.seed)

    def choose(self, all_ids: torch.LongTensor, logits: torch.Tensor) -> tuple[int, float, Alternatives | None]:
        """all_ids: (1, T) prompt + generated so far; logits: (1, V) for the next position, on all_ids' device (the
        penalties gather and scatter the logits at those ids).

        The alternatives come from the same log-softmax as the chosen token's logprob, so a greedy token is always
        the first of them (up to ties) and they agree with it to the last bit.
        """
        scores = self.processors(all_ids, cast(torch.FloatTensor, logits.float()))  # (1, V)
        logprobs = torch.log_softmax(scores, dim=-1)  # (1, V)
        if self.generator is None:
            token = int(scores.argmax(dim=-1).item())
        else:
            # The generator lives on the CPU so a seed gives the same tokens whatever the device.
            probs = logprobs.exp().cpu()
            token = int(torch.multinomial(probs, 1, generator=self.generator).item())
        top: Alternatives | None = None
        if self.top_logprobs > 0:
            values, ids = logprobs[0].topk(self.top_logprobs)  # sorted, most likely first
            # top_p/top_k leave the rest at -inf: no sample can pick them, and JSON cannot carry the value.
            kept = values > float("-inf")
            top = tuple(zip(ids[kept].tolist(), values[kept].tolist(), strict=True))
        return token, float(logprobs[0, token].item()), top
