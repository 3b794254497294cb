"""Prometheus metrics, owned by one app through its own CollectorRegistry (so tests can build many apps).

Names carry their units; every request metric has a `mode` label so merged and unmerged serving can be compared
directly. Buckets follow vLLM's latency buckets, stretched for CPU serving where a request can take minutes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from server.engine.engine import EngineInfo

# vLLM's TTFT buckets cover both a fast GPU and a slow CPU; request durations reuse them.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
# vLLM's TPOT buckets, with finer steps at the low end where merged vs unmerged differences live.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


REQUEST_LABELS = ["mode", "adapter"]  # adapter: the served adapter set, e.g. "pirate" or "pirate+legal"


class Metrics:
    def __init__(self, adapter: str = "") -> None:
        self.adapter = adapter
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "mergeserve_request_duration_seconds", "End-to-end request latency, validation to response.",
            REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "mergeserve_request_queue_duration_seconds", "Time a request waited before the engine took it.",
            REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "mergeserve_request_inference_duration_seconds", "Prefill plus decode time of a request.",
            REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "mergeserve_request_time_per_output_token_seconds", "Inference time divided by generated tokens.",
            REQUEST_LABELS, buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Histogram(
            "mergeserve_request_prompt_tokens",
            "Prompt length in tokens.",
            REQUEST_LABELS,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Histogram(
            "mergeserve_request_generated_tokens", "Generated tokens per request.",
            REQUEST_LABELS, buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "mergeserve_time_to_first_token_seconds", "From arrival (queueing included) to the first token.",
            REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "mergeserve_inter_token_latency_seconds", "Gap between consecutive tokens of one request.",
            REQUEST_LABELS, buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mergeserve_batch_size", "Requests sharing each decode step.", ["mode"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_size = Gauge("mergeserve_queue_size", "Requests waiting to join the batch.", ["mode"], registry=r)
        self.requests = Counter(
            "mergeserve_requests", "Finished requests by finish reason.", [*REQUEST_LABELS, "finish_reason"], registry=r
        )
        self.failures = Counter(
            "mergeserve_request_failures",
            "Failed requests by TGI error_type.",
            [*REQUEST_LABELS, "error_type"],
            registry=r,
        )
        self.in_flight = Gauge(
            "mergeserve_requests_in_flight", "Requests being served now.", REQUEST_LABELS, registry=r
        )
        self.boot_phase = Gauge(
            "mergeserve_boot_phase_duration_seconds", "Duration of each boot phase.", ["phase"], registry=r
        )
        self.ready = Gauge("mergeserve_ready", "1 once boot finished and the server takes requests.", registry=r)
        self.parity_diff = Gauge(
            "mergeserve_parity_max_abs_logit_diff",
            "Merged vs unmerged max abs logit diff at boot.",
            ["mode"],
            registry=r,
        )
        self.parity_top1 = Gauge(
            "mergeserve_parity_top1_agreement", "Merged vs unmerged argmax agreement at boot.", ["mode"], registry=r
        )
        self.cache_hit = Gauge(
            "mergeserve_merge_cache_hit", "1 if the merged model came from the merge cache, 0 if merged at boot.",
            registry=r,
        )  # fmt: skip
        self.cache_corrupt = Counter(
            "mergeserve_merge_cache_corrupt_entries", "Damaged merge cache entries found, discarded and rebuilt.",
            registry=r,
        )  # fmt: skip
        self.parity_float32 = Gauge(
            "mergeserve_parity_float32_max_abs_logit_diff",
            "Max abs logit diff at boot against the unmerged model run in float32, per arm: the serving dtype's cost.",
            ["mode", "arm"],
            registry=r,
        )
        self.model_info = Info(
            "mergeserve_model", "What this process serves: base_model, adapters, dtype, device, mode.", registry=r
        )

    def observe_step(self, mode: str, batch_size: int, queue_size: int) -> None:
        self.batch_size.labels(mode=mode).observe(batch_size)
        self.queue_size.labels(mode=mode).set(queue_size)

    def observe_boot_phase(self, phase: str, seconds: float) -> None:
        self.boot_phase.labels(phase=phase).set(seconds)

    def engine_ready(self, info: EngineInfo) -> None:
        # Phases were reported live during boot when this app watched it; an injected engine brings its own timings.
        for phase, seconds in info.boot_seconds.items():
            self.observe_boot_phase(phase, seconds)
        if info.parity is not None:
            self.parity_diff.labels(mode=info.mode).set(info.parity.max_abs_diff)
            self.parity_top1.labels(mode=info.mode).set(info.parity.top1_agreement)
            for arm, value in (
                ("merged", info.parity.float32_merged_max_abs_diff),
                ("unmerged", info.parity.float32_unmerged_max_abs_diff),
            ):
                if value is not None:
                    self.parity_float32.labels(mode=info.mode, arm=arm).set(value)
        if info.cache.get("enabled"):
            self.cache_hit.set(1 if info.cache.get("hit") else 0)
            self.cache_corrupt.inc(info.cache.get("corrupt_entries", 0))
        self.model_info.info(
            {
                "base_model": info.model_id,
                "adapters": ",".join(f"{a.name}:{a.weight:g}" for a in info.adapters),
                "dtype": info.dtype,
                "device": ",".join(sorted(info.device_map)),
                "mode": info.mode,
            }
        )
        self.ready.set(1)
