"""Starting one AsyncLLM per arm, and asking one for its prompt logprobs (the gate's measurement).

vLLM registers its Prometheus metrics in prometheus_client's global registry, and each new engine first unregisters
every `vllm:` collector there, so the second A/B arm would erase the first's. Each engine's collectors are therefore
moved into a registry of its own right after it starts; `VllmMetrics` exposes all of them as one set of families
(each sample keeps vLLM's `model_name` label, which is the arm).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric

from server.config.schema import Config
from server.vllm_engine.loop import LoopThread
from server.vllm_engine.scheduler import VllmArm
from server.vllm_engine.settings import ArmPlan, engine_args, environment

log = logging.getLogger("mergeserve.vllm")


class VllmMetrics:
    """A collector over the arms' vLLM registries, merging families of the same name."""

    def __init__(self) -> None:
        self.registries: list[CollectorRegistry] = []

    def adopt(self) -> None:
        """Move the `vllm:` collectors an engine just registered globally into a registry of their own."""
        registry = CollectorRegistry(auto_describe=False)
        for collector in list(REGISTRY._collector_to_names):  # prometheus_client has no public listing
            if getattr(collector, "_name", "").startswith("vllm:"):
                REGISTRY.unregister(collector)
                registry.register(collector)
        self.registries.append(registry)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for registry in self.registries:
            for family in registry.collect():
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        return families.values()


async def _start(args: dict[str, Any]) -> Any:
    # Inside the loop: AsyncLLM starts its output handler on the running loop.
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


def start_arms(
    config: Config, plans: list[ArmPlan], dtype: str, loop: LoopThread, metrics: VllmMetrics
) -> dict[str, VllmArm]:
    """One engine per arm, started one after the other (each engine-core process takes its memory at start-up)."""
    os.environ.update(environment(config))
    arms: dict[str, VllmArm] = {}
    try:
        for plan in plans:
            args = engine_args(config, plan, dtype)
            lora_note = f" with LoRA {plan.adapter_dir} (rank {plan.adapter_rank})" if plan.adapter_dir else ""
            log.info("vLLM arm %s: starting on %s%s", plan.arm, plan.model_dir, lora_note)
            engine = loop.run(_start(args))
            metrics.adopt()
            lora = None
            if plan.adapter_dir is not None:
                from vllm.lora.request import LoRARequest

                lora = LoRARequest(f"{plan.arm}-adapters", 1, str(plan.adapter_dir))
            arms[plan.arm] = VllmArm(engine, lora)
    except BaseException:
        for arm in arms.values():
            arm.engine.shutdown()
        raise
    return arms


async def _prompt_logprobs(arm: VllmArm, ids: list[int], request_id: str) -> list[dict[int, Any] | None]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    final = None
    async for out in arm.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id, lora_request=arm.lora):
        final = out
    assert final is not None and final.prompt_logprobs is not None
    return list(final.prompt_logprobs)


def prompt_logprobs(loop: LoopThread, arm_name: str, arm: VllmArm, probes: list[list[int]]) -> list[list[Any]]:
    """vLLM's prompt logprobs for each probe's token ids, as served by this arm."""
    return [loop.run(_prompt_logprobs(arm, ids, f"gate-{arm_name}-{i}")) for i, ids in enumerate(probes)]
