"""The vLLM engine in process: both A/B arms served by vLLM, every token checked against PEFT's own merge.

The reference is the base with both adapters combined and merged by PEFT (`weighted_reference`), run as one plain
forward over prompt + generated ids: no vLLM, no mergeserve code. The merged arm is our merged checkpoint; the
unmerged arm is vLLM's LoRA path with our concatenated adapter; both must serve the reference's tokens.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import PreTrainedModel

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import Generation, Overloaded, PreparedRequest
from tests.reference import (
    assert_served_like_reference,
    reference_greedy,
    reference_logprobs,
    reference_penalised,
)
from tests.vllm_engine.conftest import vllm_config, weighted_reference

PROMPTS = ["The capital of France is", "Arr matey, hoist", "def fibonacci(n):", "Once upon a time there was a small"]
# vLLM's CPU kernels sum in another order than transformers' forward: 3e-5 on the demo in float32.
TOL = 2e-3


@pytest.fixture(scope="module")
def reference(vllm_model: dict[str, Path]) -> PreTrainedModel:
    return weighted_reference(vllm_model)


def _served(gen: Generation) -> list[tuple[int, float]]:
    return [(t.id, t.logprob) for t in gen.tokens]


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_greedy_tokens_and_logprobs_match_the_reference(
    ab_engine: Engine, reference: PreTrainedModel, arm: str
) -> None:
    for prompt in PROMPTS:
        ids = ab_engine.tokenize(prompt)
        gen = ab_engine.generate(PreparedRequest(ids, SamplingParams(), 12, top_logprobs=3), arm)
        assert_served_like_reference(reference, ids, _served(gen), TOL)
        assert [t.id for t in gen.tokens] == reference_greedy(reference, ids, 12, ab_engine.eos_ids)
        expected = reference_logprobs(reference, ids, [t.id for t in gen.tokens])  # (N, V)
        for step, token in enumerate(gen.tokens):
            assert token.top is not None and len(token.top) == 3
            best = expected[step].topk(3)
            assert [i for i, _ in token.top] == best.indices.tolist(), f"{arm} step {step}"
            assert max(abs(v - e) for (_, v), e in zip(token.top, best.values.tolist(), strict=True)) <= TOL


def test_both_arms_passed_the_vllm_gate(ab_engine: Engine) -> None:
    gate = ab_engine.info.engine["gate"]
    assert {g["arm"] for g in gate} == {"merged", "unmerged"}
    assert all(g["passed"] and g["max_abs_diff"] <= g["tolerance"] and g["positions"] > 10 for g in gate)
    # float32: engine noise (~3e-5) over the adapters' effect (~0.6 RMS): far inside the bound.
    assert all(0 < g["adapter_ratio"] < g["max_adapter_ratio"] / 100 and g["adapter_effect_rms"] > 0.1 for g in gate)


def test_concurrent_requests_each_match_the_reference(ab_engine: Engine, reference: PreTrainedModel) -> None:
    """Six requests of mixed lengths at once on both arms: vLLM batches them, and each row must still be its own."""

    async def run() -> list[tuple[list[int], Generation]]:
        async def one(prompt: str, n: int, arm: str) -> tuple[list[int], Generation]:
            ids = ab_engine.tokenize(prompt)
            last = Generation()
            async for _, step in ab_engine.stream(PreparedRequest(ids, SamplingParams(), n), arm):
                last = step
            return ids, last

        jobs = [one(p, 6 + 3 * i, ("merged", "unmerged")[i % 2]) for i, p in enumerate(PROMPTS + PROMPTS[:2])]
        return await asyncio.gather(*jobs)

    for ids, gen in asyncio.run(run()):
        assert gen.finish_reason is not None
        assert_served_like_reference(reference, ids, _served(gen), TOL)


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_seeded_sampling_reports_the_tempered_logprob(ab_engine: Engine, reference: PreTrainedModel, arm: str) -> None:
    ids = ab_engine.tokenize(PROMPTS[0])
    params = SamplingParams(do_sample=True, temperature=0.7, seed=1234)
    first = ab_engine.generate(PreparedRequest(ids, params, 10), arm)
    again = ab_engine.generate(PreparedRequest(ids, params, 10), arm)
    assert first.seed == 1234 and [t.id for t in first.tokens] == [t.id for t in again.tokens]
    assert_served_like_reference(reference, ids, _served(first), TOL, temperature=0.7)


def test_stop_sequence_and_length_follow_tgi(ab_engine: Engine, reference: PreTrainedModel) -> None:
    ids = ab_engine.tokenize(PROMPTS[1])
    expected = reference_greedy(reference, ids, 12, ab_engine.eos_ids)
    full = ab_engine.decode(expected)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {full!r}"
    gen = ab_engine.generate(PreparedRequest(ids, SamplingParams(), 12, stop=[stop]), "unmerged")
    served = [t.id for t in gen.tokens]
    # TGI's rule: generation stops at the token that completes the stop string (which may run past it).
    assert gen.finish_reason == "stop_sequence" and served == expected[: len(served)]
    assert stop in gen.text and stop not in ab_engine.decode(served[:-1])
    short = ab_engine.generate(PreparedRequest(ids, SamplingParams(), 3), "merged")
    assert short.finish_reason == "length" and [t.id for t in short.tokens] == expected[:3]


def test_each_arm_counts_its_own_tokens_in_a_registry_of_its_own(ab_engine: Engine) -> None:
    """The arms' engines start together, each with its own Prometheus registry: both arms' counters are exposed,
    each counts only its own tokens, and prometheus_client's global registry (which each engine start clears of
    `vllm:` collectors) holds none of them."""

    def tokens_by_arm() -> dict[str, float]:
        family = next(f for f in ab_engine.collector.collect() if f.name == "vllm:generation_tokens")
        return {s.labels["model_name"]: s.value for s in family.samples if s.name.endswith("_total")}

    before = tokens_by_arm()
    gen = ab_engine.generate(PreparedRequest(ab_engine.tokenize(PROMPTS[0]), SamplingParams(), 5), "unmerged")
    deadline = time.monotonic() + 10  # vLLM records the step's stats just after handing its outputs over
    while (after := tokens_by_arm()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(after) == {"merged", "unmerged"} and len(gen.tokens) > 0
    assert (after["merged"] - before["merged"], after["unmerged"] - before["unmerged"]) == (0, len(gen.tokens))
    assert not [f.name for f in REGISTRY.collect() if f.name.startswith("vllm:")]


def test_cancel_frees_the_slot_and_overload_is_refused(ab_engine: Engine) -> None:
    """max_concurrent_requests is 6: the seventh is refused; cancelling gives the slots back at once."""
    ids = ab_engine.tokenize(PROMPTS[3])
    handles = [
        ab_engine.submit(PreparedRequest(ids, SamplingParams(), 16), lambda *_: None, "merged") for _ in range(6)
    ]
    with pytest.raises(Overloaded):
        ab_engine.submit(PreparedRequest(ids, SamplingParams(), 16), lambda *_: None, "merged")
    for handle in handles:
        handle.cancel()
    deadline = time.monotonic() + 10
    while ab_engine.scheduler.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ab_engine.scheduler.load == (0, 0)
    engines = [arm.engine for arm in ab_engine.scheduler.arms.values()]  # type: ignore[attr-defined]
    while any(e.get_num_unfinished_requests() for e in engines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e.get_num_unfinished_requests() for e in engines] == [0, 0]  # vLLM aborted them too
    gen = ab_engine.generate(PreparedRequest(ids, SamplingParams(), 4), "merged")
    assert len(gen.tokens) == 4


def test_what_vllm_cannot_do_the_tgi_way_is_refused(ab_engine: Engine) -> None:
    ids = ab_engine.tokenize(PROMPTS[0])
    typical = PreparedRequest(ids, SamplingParams(do_sample=True, typical_p=0.5), 4)
    frequency = PreparedRequest(ids, SamplingParams(frequency_penalty=0.5), 4)
    assert "typical_p" in (ab_engine.unsupported(typical) or "")
    assert "frequency_penalty" in (ab_engine.unsupported(frequency) or "")
    assert ab_engine.unsupported(PreparedRequest(ids, SamplingParams(repetition_penalty=1.2), 4)) is None


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_openais_penalties_are_served_as_openai_defines_them(
    ab_engine: Engine, reference: PreTrainedModel, arm: str
) -> None:
    """The /v1 routes' frequency and presence penalties are vLLM's own: counted over the generated tokens only. The
    expected tokens apply OpenAI's formula to plain forwards of the reference. Negative values (OpenAI allows down
    to -2) favour repeats, so they change even an answer that never repeats a token."""
    ids, n = ab_engine.tokenize(PROMPTS[1]), 12
    greedy = reference_greedy(reference, ids, n, ab_engine.eos_ids)
    changed = 0
    for frequency, presence in ((0.8, 1.2), (-2.0, -2.0)):
        out = reference_penalised(reference, ids, n, ab_engine.eos_ids, frequency, presence)
        request = PreparedRequest(ids, SamplingParams(output_frequency_penalty=frequency, presence_penalty=presence), n)
        assert ab_engine.unsupported(request) is None
        assert [t.id for t in ab_engine.generate(request, arm).tokens] == out, (frequency, presence)
        changed += out != greedy
    assert changed  # the penalties changed an answer, so the comparisons above tested them


def test_tensor_parallel_2_serves_the_same_greedy_tokens(
    ab_engine: Engine, reference: PreTrainedModel, vllm_model: dict[str, Path], tmp_path: Path
) -> None:
    """Two CPU workers, one core each (VLLM_CPU_OMP_THREADS_BIND '0|1'), each holding half of every layer's heads."""
    cache = Path(ab_engine.info.cache["dir"])
    config = load_config(
        vllm_config(vllm_model, tmp_path, mode="merged", engine={"tensor_parallel_size": 2}, cache={"dir": str(cache)})
    )
    tp2 = boot(config)
    engines = [weakref.ref(arm.engine) for arm in tp2.scheduler.arms.values()]  # type: ignore[attr-defined]
    try:
        assert tp2.info.cache["status"] == "hit"  # the very checkpoint the TP=1 merged arm serves
        for prompt in PROMPTS:
            ids = tp2.tokenize(prompt)
            sharded = tp2.generate(PreparedRequest(ids, SamplingParams(), 12), "merged")
            whole = ab_engine.generate(PreparedRequest(ids, SamplingParams(), 12), "merged")
            assert [t.id for t in sharded.tokens] == [t.id for t in whole.tokens]
            assert_served_like_reference(reference, ids, _served(sharded), TOL)
    finally:
        tp2.close()
    del tp2
    gc.collect()
    assert [ref() for ref in engines] == [None]  # nothing of ours keeps a closed engine (and its processes' state)


def test_the_gate_refuses_a_missing_adapter(
    ab_engine: Engine, vllm_model: dict[str, Path], reference: PreTrainedModel
) -> None:
    """vLLM serving the bare base (the unmerged arm's engine without its LoRA request) against the reference: the
    adapters move the logprobs past every dtype's tolerance, and the ratio shows they are not there: exit 3."""
    from transformers import LlamaForCausalLM

    from server.errors import ExitCode, MergeserveError
    from server.merge.parity import MAX_ADAPTER_RATIO
    from server.vllm_engine import gate
    from server.vllm_engine.engines import prompt_logprobs
    from server.vllm_engine.scheduler import VllmArm

    base = LlamaForCausalLM.from_pretrained(vllm_model["base"]).eval()
    backend = ab_engine.scheduler
    bare = VllmArm(backend.arms["unmerged"].engine, None)  # type: ignore[attr-defined]
    probes = [ab_engine.tokenize(p) for p in PROMPTS]
    served = prompt_logprobs(backend.loop, "unmerged", bare, probes)  # type: ignore[attr-defined]
    triples = []
    with torch.no_grad():
        for ids, got in zip(probes, served, strict=True):
            want = reference(input_ids=torch.tensor([ids])).logits[0]
            without = base(input_ids=torch.tensor([ids])).logits[0]
            triples.append((gate.reference_logprobs(ids, want), gate.served_logprobs(ids, got),
                            gate.reference_logprobs(ids, without)))  # fmt: skip
    result = gate.compare("unmerged", triples, "float32")
    assert not result.passed and result.max_abs_diff > max(gate.TOLERANCES.values())
    assert result.adapter_ratio > 10 * MAX_ADAPTER_RATIO  # served == base up to the engines' noise
    with pytest.raises(MergeserveError) as refused:
        gate.check([result])
    line = refused.value.line()
    assert refused.value.exit_code == ExitCode.CHECK_FAILED and "refusing to serve" in line
    assert "the adapters' own effect" in line


def test_a_gate_that_compared_no_position_refuses() -> None:
    """One-token probes give no prompt logprob to compare: max(..., default=0.0) used to pass that as a perfect
    match. A gate that checked nothing must not report the engine good."""
    from server.errors import ExitCode, MergeserveError
    from server.vllm_engine import gate

    result = gate.compare("merged", [([], [], [])], "float32")
    assert result.positions == 0 and not result.passed
    with pytest.raises(MergeserveError) as refused:
        gate.check([result])
    assert refused.value.exit_code == ExitCode.CHECK_FAILED and "parity.probes" in refused.value.line()


def test_an_adapter_vllm_cannot_apply_is_refused_before_loading(vllm_model: dict[str, Path], tmp_path: Path) -> None:
    from server.errors import ExitCode
    from server.load.adapters import BootError
    from tests.conftest import build_adapter

    dora = build_adapter(vllm_model["base"], tmp_path / "dora", seed=5, use_dora=True)
    config = load_config(vllm_config({**vllm_model, "alpha": dora}, tmp_path, mode="unmerged"))
    with pytest.raises(BootError) as refused:
        boot(config)
    line = refused.value.line()
    assert refused.value.exit_code == ExitCode.BAD_INPUT and "use mode: merged" in line and "use_dora" in line
    assert not (tmp_path / "cache" / "entries").exists()  # refused before anything was merged or stored
