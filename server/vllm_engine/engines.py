"""Starting one AsyncLLM per arm, and asking one for its prompt logprobs (the gate's measurement).

vLLM registers its Prometheus metrics in prometheus_client's global registry, and each new engine first unregisters
every `vllm:` collector there, so the second A/B arm would erase the first's. Each arm's engine is therefore given a
Prometheus stat logger of its own (vLLM builds its metrics through the logger's `_gauge_cls`, `_counter_cls` and
`_histogram_cls`, the hooks its Ray logger uses too) whose metrics go into a registry of that arm's; `VllmMetrics`
exposes all of them as one set of families (each sample keeps vLLM's `model_name` label, which is the arm).

With nothing global shared, the arms' engines start together on the CPU: each start is mostly its engine-core and
worker processes importing vLLM and torch, single-threaded work that a second core halves. On a GPU they start one
after the other: each engine's start-up check reads the device's free memory, which the other is taking.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from server.config.schema import Config
from server.vllm_engine.loop import LoopThread
from server.vllm_engine.scheduler import VllmArm
from server.vllm_engine.settings import ArmPlan, engine_args, environment, on_cpu

log = logging.getLogger("mergeserve.vllm")
# The metric classes vLLM's Prometheus logger and its helpers (speculative decoding, KV/EC connectors, perf
# counters) build their metrics through, and the helpers it builds them with.
METRIC_CLASSES = {"_gauge_cls": Gauge, "_counter_cls": Counter, "_histogram_cls": Histogram}
HELPERS = ("_spec_decoding_cls", "_kv_connector_cls", "_ec_connector_cls", "_perf_metrics_cls")


def _into(base: type, registry: CollectorRegistry) -> type:
    """`base` with each metric class it builds through registering into `registry` instead of the global one."""
    overrides = {attr: partial(cls, registry=registry) for attr, cls in METRIC_CLASSES.items() if hasattr(base, attr)}
    return type(f"Arm{base.__name__}", (base,), overrides)


class VllmMetrics:
    """A collector over the arms' vLLM registries, merging families of the same name."""

    def __init__(self) -> None:
        self.registries: list[CollectorRegistry] = []

    def stat_logger(self) -> type:
        """A vLLM Prometheus stat logger class for one engine, with a registry of its own in this collector."""
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        registry = CollectorRegistry(auto_describe=False)
        self.registries.append(registry)
        logger_cls = _into(PrometheusStatLogger, registry)
        for helper in HELPERS:
            if hasattr(logger_cls, helper):
                setattr(logger_cls, helper, _into(getattr(logger_cls, helper), registry))
        return logger_cls

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for registry in self.registries:
            for family in registry.collect():
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        return families.values()


def _start(config: Config, plan: ArmPlan, dtype: str, stat_logger: type) -> VllmArm:
    """One arm's engine, built on the calling thread: outside the event loop, AsyncLLM starts its output handler on
    the loop that first calls it (ours, at the gate's first request)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    lora_note = f" with LoRA {plan.adapter_dir} (rank {plan.adapter_rank})" if plan.adapter_dir else ""
    log.info("vLLM arm %s: starting on %s%s", plan.arm, plan.model_dir, lora_note)
    start = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(config, plan, dtype)), stat_loggers=[stat_logger])
    log.info("vLLM arm %s: started in %.1f s", plan.arm, time.perf_counter() - start)
    lora = None
    if plan.adapter_dir is not None:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(f"{plan.arm}-adapters", 1, str(plan.adapter_dir))
    return VllmArm(engine, lora)


def _import_vllm() -> None:
    # Importing vLLM leaves the importing frames alive for good (measured: the frames of `start_arms` and `boot_vllm`
    # outlived the server's engines, keeping them from being freed at close), with every local they end up holding:
    # the first import runs on a thread of its own, whose frames hold nothing.
    import vllm.engine.arg_utils
    import vllm.lora.request
    import vllm.v1.engine.async_llm
    import vllm.v1.metrics.loggers  # noqa: F401


def start_arms(config: Config, plans: list[ArmPlan], dtype: str, metrics: VllmMetrics) -> dict[str, VllmArm]:
    """One engine per arm: together on the CPU, one after the other on a GPU (see the module's docstring). When one
    fails, those not started yet are not started, those up are shut down, and the failure is raised."""
    os.environ.update(environment(config))
    importer = threading.Thread(target=_import_vllm, name="vllm-import")
    importer.start()
    importer.join()
    with ThreadPoolExecutor(len(plans) if on_cpu() else 1, thread_name_prefix="vllm-start") as pool:
        futures = [pool.submit(_start, config, plan, dtype, metrics.stat_logger()) for plan in plans]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            return {plan.arm: future.result() for plan, future in zip(plans, futures, strict=True)}
        except BaseException:
            _shut_down_started(futures)
            raise


def _shut_down_started(futures: list[Future[VllmArm]]) -> None:
    for future in futures:
        future.cancel()  # only those still queued; a start under way runs to its end
    wait(futures)
    for future in futures:
        if not future.cancelled() and future.exception() is None:
            future.result().engine.shutdown()


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
