"""Mixed forwards (server.engine.mixed): decode rows and prefill chunks in one forward, every logit checked against
a plain `model(input_ids)` forward of that row's whole sequence (tests/engine/test_kv_slab.py's reference)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.attention import use_slab_attention
from server.engine.batch import Batch
from server.engine.sampling import SamplingParams
from server.engine.scheduler import MIXED_FAILURE_LIMIT, Scheduler
from server.engine.types import Generation, PreparedRequest, Token
from tests.engine.test_kv_slab import _check, _drain_prefill, _prompt, _req, _slab_model, _Tok


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_rows_and_prefill_chunks_in_one_forward_get_plain_forward_logits(
    arch: str, tiny_base: Path, tiny_gpt2: Path
) -> None:
    model = _slab_model(tiny_base if arch == "llama" else tiny_gpt2)
    vocab = model.config.vocab_size
    lengths = [("a", 3), ("b", 9), ("c", 13), ("d", 2)]
    seqs = {name: _prompt(i, length, vocab) for i, (name, length) in enumerate(lengths)}
    batch: Batch[str] = Batch(slots=4, budget=8)  # c: chunks of 8 and 5 tokens, d (2) goes between them alone
    for name in ("a", "b"):
        batch.add(name, list(seqs[name]))
    _drain_prefill(model, batch, seqs)
    mixed = checked = 0
    for step in range(10):
        if step == 1:
            batch.add("c", list(seqs["c"]))
        if step == 2:
            batch.add("d", list(seqs["d"]))
        if step == 6:  # a leaves: b moves into its slot, while nothing is prefilling
            batch.filter([i for i, row in enumerate(batch.rows) if row != "a"])
        tokens = torch.tensor([[seqs[row][-1]] for row in batch.rows])  # (B, 1)
        chunks = batch.next_chunks()
        if chunks:
            logits, finished = batch.mixed(model, tokens, chunks)
            mixed += 1
        else:
            logits, finished = batch.step(model, tokens), []
        for i, row in enumerate(batch.rows):
            _check(model, seqs, row, logits[i : i + 1])
            checked += 1
        for row, first in finished:
            _check(model, seqs, row, first)
            batch.join(row)
    assert mixed == 3 and set(batch.rows) == {"b", "c", "d"}
    assert checked >= 10 * 2 + 3 * 3


def test_a_model_that_drops_attention_kwargs_is_served_apart_with_the_same_tokens(tiny_base: Path) -> None:
    """If the plan never reaches attention, every mixed forward fails (here with a shape error, not NotMixable): the
    lane reruns each such turn's forwards apart, and stops mixing after MIXED_FAILURE_LIMIT failures in a row.
    Every token still equals a plain forward's greedy token."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    for layer in model.model.layers:
        real = layer.self_attn.forward

        def dropping(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            kwargs.pop("slab_plan", None)
            return _real(*args, **kwargs)

        layer.self_attn.forward = dropping
    assert use_slab_attention(model)
    vocab = model.config.vocab_size
    # Each newcomer arrives while "long" decodes, so its prefill would mix: one more than the limit.
    late = {f"late{i}": _prompt(2 + i, 6, vocab) for i in range(MIXED_FAILURE_LIMIT + 1)}
    prompts = {"long": _prompt(1, 5, vocab), **late}
    outputs: dict[str, list[int]] = {}
    done = threading.Event()
    scheduler = Scheduler({"m": model}, _Tok(), set(), max_batch_size=4, max_concurrent_requests=4, prefill_budget=8)
    lane = scheduler.lanes["m"]
    real_mixed, attempts = lane.batch.mixed, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        attempts.append(len(outputs))
        return real_mixed(*args, **kwargs)

    lane.batch.mixed = counted  # type: ignore[method-assign]

    def emit_for(name: str) -> Any:
        def emit(item: Token | BaseException, gen: Generation) -> None:
            assert not isinstance(item, BaseException), item
            if name == "long" and len(gen.tokens) % 3 == 2 and len(gen.tokens) // 3 < len(late):
                newcomer = f"late{len(gen.tokens) // 3}"  # on the model thread: it would mix at the next turn
                scheduler.submit(_req(prompts[newcomer], 2), emit_for(newcomer))
            if gen.finish_reason is not None:
                outputs[name] = [t.id for t in gen.tokens]
                if len(outputs) == len(prompts):
                    done.set()

        return emit

    try:
        scheduler.submit(_req(prompts["long"], 16), emit_for("long"))
        assert done.wait(timeout=60)
    finally:
        scheduler.close()
    assert len(attempts) == MIXED_FAILURE_LIMIT and lane.mixes is False  # the last newcomer was not tried mixed
    for name, ids in prompts.items():
        expected = greedy(model, ids, len(outputs[name]))
        assert outputs[name] == expected, name


@torch.inference_mode()
def greedy(model: Any, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def test_an_empty_prompt_arriving_mid_decode_is_refused_not_given_another_requests_row(tiny_base: Path) -> None:
    """Issue 26: a zero-token prompt has no position of its own, so in a mixed forward its chunk's logit index is the
    previous position: the last decode row, another user's next-token distribution. The scheduler must refuse it
    when it is submitted, here at the moment the running request's forward would mix with it."""
    model = _slab_model(tiny_base)
    scheduler = Scheduler({"m": model}, _Tok(), set(), max_batch_size=4, max_concurrent_requests=4, prefill_budget=8)
    running: list[Token] = []
    joined: list[Token | BaseException] = []
    refusals: list[ValueError] = []
    done = threading.Event()

    def emit(item: Token | BaseException, gen: Generation) -> None:
        assert isinstance(item, Token), item
        running.append(item)
        if len(running) == 2:  # on the model thread: the empty prompt is admitted at the next turn, a mixed one
            try:
                scheduler.submit(
                    PreparedRequest([], SamplingParams(), 1, top_logprobs=3), lambda i, _: joined.append(i)
                )
            except ValueError as exc:
                refusals.append(exc)
        if gen.finish_reason is not None:
            done.set()

    try:
        scheduler.submit(PreparedRequest(_prompt(1, 5, model.config.vocab_size), SamplingParams(), 6,
                                         top_logprobs=3), emit)  # fmt: skip
        assert done.wait(timeout=30)
    finally:
        scheduler.close()
    leaked = [j for j in joined if isinstance(j, Token) and j.top == running[2].top]
    assert refusals and not joined, f"accepted; served {joined}; the running request's 3rd row: {bool(leaked)}"


def test_one_failed_mixed_forward_does_not_turn_mixing_off_for_good(tiny_base: Path) -> None:
    """Issue 28, item 14: a mixed forward that fails once for a passing reason (an allocation, say) is rerun apart,
    and the lane mixes again at the next chance; only a model that cannot mix (`NotMixable`) stops it for good.
    Every token still equals a plain forward's greedy token."""
    model = _slab_model(tiny_base)
    vocab = model.config.vocab_size
    prompts = {"long": _prompt(1, 5, vocab), "late": _prompt(2, 6, vocab), "later": _prompt(3, 4, vocab)}
    outputs: dict[str, list[int]] = {}
    done = threading.Event()
    scheduler = Scheduler({"m": model}, _Tok(), set(), max_batch_size=4, max_concurrent_requests=4, prefill_budget=8)
    lane = scheduler.lanes["m"]
    real, calls = lane.batch.mixed, {"failed": 0, "mixed": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if not calls["failed"]:
            calls["failed"] += 1
            raise RuntimeError("transient: could not allocate")
        calls["mixed"] += 1
        return real(*args, **kwargs)

    lane.batch.mixed = flaky  # type: ignore[method-assign]

    def emit_for(name: str) -> Any:
        def emit(item: Token | BaseException, gen: Generation) -> None:
            assert not isinstance(item, BaseException), item
            if name == "long" and len(gen.tokens) in (2, 8):  # on the model thread: each newcomer mixes next turn
                late = "late" if len(gen.tokens) == 2 else "later"
                scheduler.submit(_req(prompts[late], 3), emit_for(late))
            if gen.finish_reason is not None:
                outputs[name] = [t.id for t in gen.tokens]
                if len(outputs) == 3:
                    done.set()

        return emit

    try:
        scheduler.submit(_req(prompts["long"], 16), emit_for("long"))
        assert done.wait(timeout=60)
    finally:
        scheduler.close()
    assert calls == {"failed": 1, "mixed": 1} and lane.mixes is True
    for name, ids in prompts.items():
        assert outputs[name] == greedy(model, ids, len(outputs[name])), name
