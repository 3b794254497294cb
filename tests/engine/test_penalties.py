"""Repetition and frequency penalties: they see the token ids on the logits' device, and compute what transformers'
RepetitionPenaltyLogitsProcessor (through `generate`) and TGI's frequency-penalty formula compute.

The host has no second device, so "the model is on a GPU" is played by a stand-in on torch's meta device: it answers
with meta logits, and a spy on the request's logits processors records where both of their arguments live. On a
GPU, ids left on the CPU make the processors' gather/scatter raise, failing every penalised request.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

import server.engine.scheduler as scheduler_module
from server.engine.sampling import SamplingParams, TokenChooser
from server.engine.scheduler import Scheduler
from server.engine.types import Generation, PreparedRequest
from tests.reference import reference_penalised

EOS = 1  # the tiny tokenizer's </s>
PROMPT = "Arr matey, hoist the sails"


class OnMeta(nn.Module):
    """Lives on the meta device and answers every forward with meta logits (B, 1, V)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.empty(0, device="meta"))
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, **kw: Any) -> Any:
        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 1, self.vocab, device="meta"))


def _run(scheduler: Scheduler, request: PreparedRequest) -> Generation:
    events: queue.Queue[tuple[Any, Generation]] = queue.Queue()
    scheduler.submit(request, lambda item, gen: events.put((item, gen)))
    while True:
        item, gen = events.get(timeout=120)
        if isinstance(item, BaseException):
            raise item
        if gen.finish_reason is not None:
            return gen


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def model(tiny_base: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def scheduler(model: LlamaForCausalLM, tokenizer: Any) -> Iterator[Scheduler]:
    s = Scheduler({"merged": model}, tokenizer, {EOS}, max_batch_size=4, max_concurrent_requests=4)
    yield s
    s.close()


def test_penalty_processors_get_ids_on_the_logits_device(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab, chosen = len(tokenizer), 10
    seen: list[tuple[torch.device, torch.device]] = []

    class Spied(TokenChooser):
        def __init__(self, params: SamplingParams, top_logprobs: int = 0, prompt_tokens: int = 0) -> None:
            super().__init__(params, top_logprobs, prompt_tokens)
            real = self.processors
            assert len(real) == 2  # both penalties are in play

            def spy(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                seen.append((ids.device, scores.device))
                real(ids, scores)
                # Meta logits hold no values: hand back CPU scores with one clear winner so choosing can go on.
                out = torch.full((1, vocab), -5.0)
                out[0, chosen] = 5.0
                return out

            self.processors = spy  # type: ignore[assignment]

    monkeypatch.setattr(scheduler_module, "TokenChooser", Spied)
    s = Scheduler({"merged": OnMeta(vocab)}, tokenizer, {EOS}, max_batch_size=2, max_concurrent_requests=2)
    try:
        params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)
        gen = _run(s, PreparedRequest(input_ids=tokenizer(PROMPT).input_ids, params=params, max_new_tokens=3))
    finally:
        s.close()
    assert [t.id for t in gen.tokens] == [chosen] * 3  # the prefill token and two decode steps
    assert len(seen) == 3
    assert all(ids == scores == torch.device("meta") for ids, scores in seen), seen


def test_repetition_penalty_matches_transformers_generate(
    scheduler: Scheduler, model: LlamaForCausalLM, tokenizer: Any
) -> None:
    ids, n, penalty = tokenizer(PROMPT).input_ids, 12, 1.8
    with torch.inference_mode():
        ref = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=penalty,
            eos_token_id=EOS, pad_token_id=EOS,
        )[0, len(ids) :].tolist()  # fmt: skip
    params = SamplingParams(repetition_penalty=penalty)
    ours = [t.id for t in _run(scheduler, PreparedRequest(input_ids=ids, params=params, max_new_tokens=n)).tokens]
    plain = [t.id for t in _run(scheduler, PreparedRequest(ids, SamplingParams(), max_new_tokens=n)).tokens]
    assert ours == ref
    assert ours != plain  # the penalty changed the answer, so the comparison above tested it


def test_frequency_penalty_matches_tgis_formula(scheduler: Scheduler, model: LlamaForCausalLM, tokenizer: Any) -> None:
    """TGI: scores - penalty x (count of the token in prompt + generated) / (their length)."""
    ids, n, penalty = tokenizer(PROMPT).input_ids, 12, 2.0
    ref = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ref])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(ref), minlength=logits.shape[0]).float()
            ref.append(int((logits - penalty * counts / len(ref)).argmax()))
            if ref[-1] == EOS:
                break
    params = SamplingParams(frequency_penalty=penalty)
    ours = [t.id for t in _run(scheduler, PreparedRequest(input_ids=ids, params=params, max_new_tokens=n)).tokens]
    plain = [t.id for t in _run(scheduler, PreparedRequest(ids, SamplingParams(), max_new_tokens=n)).tokens]
    assert ours == ref[len(ids) :]
    assert ours != plain


@pytest.mark.parametrize(("frequency", "presence"), [(1.5, 0.0), (0.0, 1.5), (0.7, 0.9)])
def test_openai_penalties_match_openais_formula(
    scheduler: Scheduler, model: LlamaForCausalLM, tokenizer: Any, frequency: float, presence: float
) -> None:
    """OpenAI (and vLLM): scores - frequency x count - presence x (count > 0), counted over the generated tokens
    only; the prompt's tokens are not penalised, unlike TGI's frequency_penalty."""
    ids, n = tokenizer(PROMPT).input_ids, 12
    out = reference_penalised(model, ids, n, {EOS}, frequency, presence)
    params = SamplingParams(output_frequency_penalty=frequency, presence_penalty=presence)
    ours = [t.id for t in _run(scheduler, PreparedRequest(input_ids=ids, params=params, max_new_tokens=n)).tokens]
    plain = [t.id for t in _run(scheduler, PreparedRequest(ids, SamplingParams(), max_new_tokens=n)).tokens]
    assert ours == out
    assert ours != plain  # the penalty changed the answer, so the comparison above tested it
