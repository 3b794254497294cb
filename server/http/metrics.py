"""Prometheus metrics, owned by one app through its own CollectorRegistry (so tests can build many apps).

Names carry their units; every request metric has a `mode` label so merged and unmerged serving can be compared
directly. Buckets follow vLLM's latency buckets, stretched for CPU serving where a request can take minutes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import MetricWrapperBase

from server.engine.engine import EngineInfo

# vLLM's TTFT buckets cover both a fast GPU and a slow CPU; request durations reuse them.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
# vLLM's TPOT buckets, with finer steps at the low end where merged vs unmerged differences live.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


PREFIX = "mergeserve_"
REQUEST_LABELS = ("mode", "adapter")  # adapter: the served adapter set, e.g. "pirate" or "pirate+legal"


class Spec(NamedTuple):
    """One metric: its kind, its name after PREFIX (also its attribute on `Metrics`), help text, labels, buckets."""

    kind: type[MetricWrapperBase]
    name: str
    help: str
    labels: tuple[str, ...] = REQUEST_LABELS
    buckets: tuple[float, ...] | None = None


def _histogram(name: str, buckets: tuple[float, ...], help: str, labels: tuple[str, ...] = REQUEST_LABELS) -> Spec:
    return Spec(Histogram, name, help, labels, buckets)


# In the order /metrics and the README's metrics reference list them.
SPECS = (
    _histogram("request_duration_seconds", LATENCY_BUCKETS, "End-to-end request latency, validation to response."),
    _histogram("request_queue_duration_seconds", LATENCY_BUCKETS, "Time a request waited before the engine took it."),
    _histogram("request_inference_duration_seconds", LATENCY_BUCKETS, "Prefill plus decode time of a request."),
    _histogram("request_time_per_output_token_seconds", TPOT_BUCKETS, "Inference time divided by generated tokens."),
    _histogram("request_prompt_tokens", TOKEN_BUCKETS, "Prompt length in tokens."),
    _histogram("request_generated_tokens", TOKEN_BUCKETS, "Generated tokens per request."),
    _histogram("time_to_first_token_seconds", LATENCY_BUCKETS, "From arrival (queueing included) to the first token."),
    _histogram("inter_token_latency_seconds", TPOT_BUCKETS, "Gap between consecutive tokens of one request."),
    _histogram("batch_size", BATCH_BUCKETS, "Requests sharing each decode step.", ("mode",)),
    Spec(Gauge, "queue_size", "Requests waiting to join the batch.", ("mode",)),
    Spec(Counter, "requests", "Finished requests by finish reason.", (*REQUEST_LABELS, "finish_reason")),
    Spec(Counter, "request_failures", "Failed requests by TGI error_type.", (*REQUEST_LABELS, "error_type")),
    Spec(Gauge, "requests_in_flight", "Requests being served now."),
    Spec(Gauge, "boot_phase_duration_seconds", "Duration of each boot phase.", ("phase",)),
    Spec(Gauge, "boot_phase_peak_rss_bytes", "Peak RSS (VmHWM) of the process at the end of each boot phase.",
         ("phase",)),
    Spec(Gauge, "ready", "1 once boot finished and the server takes requests.", ()),
    Spec(Gauge, "parity_max_abs_logit_diff",
         "The merged model's max abs logit diff at boot against the parity reference (bf16/fp16: the unmerged model in "
         "float32; else the unmerged model).", ("mode",)),
    Spec(Gauge, "parity_top1_agreement", "The merged model's argmax agreement at boot with the parity reference.",
         ("mode",)),
    Spec(Gauge, "merge_cache_hit", "1 if the merged model came from the merge cache, 0 if merged at boot.", ()),
    Spec(Gauge, "merge_cache_available", "1 if the merge cache could be used (read and written) at boot, 0 if the "
         "boot served without it (read-only or full folder: see /info cache.problem).", ()),
    Spec(Counter, "merge_cache_corrupt_entries", "Damaged merge cache entries found, discarded and rebuilt.", ()),
    Spec(Gauge, "parity_float32_max_abs_logit_diff",
         "Max abs logit diff at boot against the unmerged model run in float32, per arm: the serving dtype's cost.",
         ("mode", "arm")),
    Spec(Gauge, "parity_float32_rms_logit_diff",
         "RMS logit diff at boot against the unmerged model run in float32, per arm: what the half-precision gate "
         "compares.", ("mode", "arm")),
    Spec(Gauge, "kv_cache_bytes", "The torch engine's KV cache budget per arm, in bytes (engine.kv_cache_gib, or "
         "limits.max_batch_size x max_total_tokens tokens).", ("mode",)),
    Spec(Gauge, "kv_cache_tokens", "Token positions the KV cache budget holds per arm; a request that would pass it "
         "waits.", ("mode",)),
    Spec(Gauge, "prefix_cache_bytes", "Most bytes each arm's prompt-prefix cache holds (engine.prefix_cache_tokens).",
         ("mode",)),
    Spec(Info, "model", "What this process serves: base_model, adapters, dtype, device, mode.", ()),
)  # fmt: skip


class Metrics:
    """One app's metrics, registered from SPECS; each is the attribute named as its metric without PREFIX."""

    request_duration_seconds: Histogram
    request_queue_duration_seconds: Histogram
    request_inference_duration_seconds: Histogram
    request_time_per_output_token_seconds: Histogram
    request_prompt_tokens: Histogram
    request_generated_tokens: Histogram
    time_to_first_token_seconds: Histogram
    inter_token_latency_seconds: Histogram
    batch_size: Histogram
    queue_size: Gauge
    requests: Counter
    request_failures: Counter
    requests_in_flight: Gauge
    boot_phase_duration_seconds: Gauge
    boot_phase_peak_rss_bytes: Gauge
    ready: Gauge
    parity_max_abs_logit_diff: Gauge
    parity_top1_agreement: Gauge
    merge_cache_hit: Gauge
    merge_cache_available: Gauge
    merge_cache_corrupt_entries: Counter
    parity_float32_max_abs_logit_diff: Gauge
    parity_float32_rms_logit_diff: Gauge
    kv_cache_bytes: Gauge
    kv_cache_tokens: Gauge
    prefix_cache_bytes: Gauge
    model: Info

    def __init__(self, adapter: str = "") -> None:
        self.adapter = adapter
        self.registry = CollectorRegistry()
        for spec in SPECS:
            extra: dict[str, Any] = {} if spec.buckets is None else {"buckets": spec.buckets}
            metric = spec.kind(PREFIX + spec.name, spec.help, spec.labels, registry=self.registry, **extra)
            setattr(self, spec.name, metric)

    def observe_step(self, mode: str, batch_size: int, queue_size: int) -> None:
        self.batch_size.labels(mode=mode).observe(batch_size)
        self.queue_size.labels(mode=mode).set(queue_size)

    def observe_boot_phase(self, phase: str, seconds: float) -> None:
        self.boot_phase_duration_seconds.labels(phase=phase).set(seconds)

    def engine_ready(self, info: EngineInfo) -> None:
        # Phases were reported live during boot when this app watched it; an injected engine brings its own timings.
        for phase, seconds in info.boot_seconds.items():
            self.observe_boot_phase(phase, seconds)
        for phase, peak in info.boot_peak_rss_bytes.items():
            self.boot_phase_peak_rss_bytes.labels(phase=phase).set(peak)
        if info.parity is not None:
            self.parity_max_abs_logit_diff.labels(mode=info.mode).set(info.parity.max_abs_diff)
            self.parity_top1_agreement.labels(mode=info.mode).set(info.parity.top1_agreement)
            p = info.parity
            max_abs = (p.float32_merged_max_abs_diff, p.float32_unmerged_max_abs_diff)
            rms = (p.float32_merged_rms_diff, p.float32_unmerged_rms_diff)
            for gauge, (merged, unmerged) in (
                (self.parity_float32_max_abs_logit_diff, max_abs),
                (self.parity_float32_rms_logit_diff, rms),
            ):
                for arm, value in (("merged", merged), ("unmerged", unmerged)):
                    if value is not None:
                        gauge.labels(mode=info.mode, arm=arm).set(value)
        kv, prefix = info.engine.get("kv_cache") or {}, info.engine.get("prefix_cache") or {}
        for arm in info.engine.get("arms", []) if kv and prefix else []:
            self.kv_cache_bytes.labels(mode=arm).set(kv["bytes_per_arm"])
            self.kv_cache_tokens.labels(mode=arm).set(kv["tokens_per_arm"])
            self.prefix_cache_bytes.labels(mode=arm).set(prefix["bytes_per_arm"])
        if info.cache.get("enabled"):
            self.merge_cache_hit.set(1 if info.cache.get("hit") else 0)
            self.merge_cache_available.set(0 if info.cache.get("status") == "unavailable" else 1)
            self.merge_cache_corrupt_entries.inc(info.cache.get("corrupt_entries", 0))
        self.model.info(
            {
                "base_model": info.model_id,
                "adapters": ",".join(f"{a.name}:{a.weight:g}" for a in info.adapters),
                "dtype": info.dtype,
                "device": ",".join(sorted(info.device_map)),
                "mode": info.mode,
            }
        )
        self.ready.set(1)
