"""Statistics for the A/B report: one Sample per request, per-arm summaries and bootstrap speed-ups.

Speed-up of merged, per level = the median over pairs of unmerged / merged (> 1: merged is faster). A pair is the
same prompt sent to both arms back to back, so its two requests generate the same greedy tokens and see nearly the
same machine: the paired ratio cancels both the spread between prompts (answer lengths differ several-fold) and slow
drift in machine load, which an unpaired ratio of medians would carry into its interval. Its 95 % CI is a
percentile bootstrap over pairs. The median, because a request that lands behind another's prefill is an outlier.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ARMS = ("merged", "unmerged")
METRICS = ("tpot", "latency", "ttft")


@dataclass
class Sample:
    """One request as the client saw it; times are perf_counter seconds, made relative to the level's start."""

    level: int
    arm: str
    pair: int
    prompt: int
    warmup: bool
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    queue: float | None = None  # the server's x-queue-time: submission to admission into the arm's batch
    text: str = ""
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency": self.latency, "tpot": self.tpot}


def measured(samples: list[Sample], level: int | None = None, arm: str | None = None) -> list[Sample]:
    return [
        s for s in samples if not s.warmup and s.error is None and level in (None, s.level) and arm in (None, s.arm)
    ]


def values(samples: list[Sample], level: int, arm: str, metric: str) -> np.ndarray:
    got = [getattr(s, metric) for s in measured(samples, level, arm)]
    return np.array([v for v in got if v is not None], dtype=float)


def boot_medians(x: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    return np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)


def verdict(lo: float, hi: float) -> str:
    if lo <= 1.0 <= hi:
        return "no significant difference"
    return "merged significantly faster" if lo > 1.0 else "unmerged significantly faster"


def summarize(point: float, draws: np.ndarray) -> dict[str, Any]:
    lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    return {"ratio": point, "lo": lo, "hi": hi, "verdict": verdict(lo, hi)}


def paired_ratios(samples: list[Sample], level: int, metric: str) -> np.ndarray:
    """unmerged / merged for each complete, counted pair of the level."""
    by_pair: dict[int, dict[str, float]] = {}
    for s in measured(samples, level):
        value = getattr(s, metric)
        if value is not None:
            by_pair.setdefault(s.pair, {})[s.arm] = value
    return np.array([p["unmerged"] / p["merged"] for p in by_pair.values() if len(p) == 2 and p["merged"] > 0])


def speedup(samples: list[Sample], metric: str, levels: list[int], resamples: int, seed: int) -> dict[str, Any]:
    """Median paired ratio per level, plus the geometric mean over levels, each with a bootstrap CI over pairs."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    logs: list[tuple[float, np.ndarray]] = []
    for level in levels:
        ratios = paired_ratios(samples, level, metric)
        if len(ratios) == 0:
            continue
        draws = boot_medians(ratios, rng, resamples)
        point = float(np.median(ratios))
        out[str(level)] = {**summarize(point, draws), "pairs": len(ratios)}
        logs.append((math.log(point), np.log(draws)))
    if len(logs) > 1:
        point = math.exp(sum(p for p, _ in logs) / len(logs))
        out["overall"] = summarize(point, np.exp(sum(d for _, d in logs) / len(logs)))
    return out


def queue_bias(samples: list[Sample], level: int, resamples: int, seed: int) -> dict[str, Any]:
    """Median queue time per arm and the unmerged - merged difference of medians, with a bootstrap 95 % CI (s).

    Unpaired: a pair's two requests arrive at different moments of the scheduler's turn, so they are not matched.
    A CI that holds 0 means no systematic bias was detected at this level.
    """
    got = {arm: np.array([s.queue for s in measured(samples, level, arm) if s.queue is not None]) for arm in ARMS}
    if any(len(v) == 0 for v in got.values()):
        return {}
    rng = np.random.default_rng(seed)
    draws = boot_medians(got["unmerged"], rng, resamples) - boot_medians(got["merged"], rng, resamples)
    lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    diff = float(np.median(got["unmerged"]) - np.median(got["merged"]))
    verdict = "no bias detected" if lo <= 0.0 <= hi else ("unmerged waits longer" if lo > 0 else "merged waits longer")
    medians = {arm: float(np.median(v)) for arm, v in got.items()}
    return {"median": medians, "diff": diff, "lo": lo, "hi": hi, "verdict": verdict}


def pctl(x: np.ndarray | list[float], q: float = 50) -> float | None:
    return float(np.percentile(x, q)) if len(x) else None


def arm_stats(samples: list[Sample], level: int, arm: str) -> dict[str, Any]:
    ok = measured(samples, level, arm)
    lat = values(samples, level, arm, "latency")
    errors = [s for s in samples if s.level == level and s.arm == arm and s.error is not None]
    return {
        "n": len(ok), "errors": len(errors), "first_error": errors[0].error if errors else None,
        "latency_p50": pctl(lat), "latency_p90": pctl(lat, 90),
        "ttft_p50": pctl(values(samples, level, arm, "ttft")), "tpot_p50": pctl(values(samples, level, arm, "tpot")),
        "stream_tokens_per_s_p50": pctl([s.tokens / s.latency for s in ok]) or 0.0,
        "mean_tokens": float(np.mean([s.tokens for s in ok])) if ok else None,
    }  # fmt: skip


def level_throughput(samples: list[Sample], level: int) -> float | None:
    ok = measured(samples, level)
    if not ok:
        return None
    return sum(s.tokens for s in ok) / (max(s.end for s in ok) - min(s.start for s in ok))


def same_text(samples: list[Sample], level: int) -> tuple[int, int]:
    """Pairs whose merged and unmerged greedy texts are identical, out of complete pairs."""
    by_pair: dict[int, dict[str, str]] = {}
    for s in samples:
        if s.level == level and s.error is None:
            by_pair.setdefault(s.pair, {})[s.arm] = s.text
    full = [p for p in by_pair.values() if len(p) == 2]
    return sum(p["merged"] == p["unmerged"] for p in full), len(full)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def both_arms_in_flight(samples: list[Sample], level: int) -> dict[str, float]:
    """Seconds of the level during which each arm had a request in flight (client clock, send to last event, warm-up
    and failed requests included: they loaded the server too), out of the level's span. 0 in isolated mode."""
    spans = {arm: _union([(s.start, s.end) for s in samples if s.level == level and s.arm == arm]) for arm in ARMS}
    both = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in spans["merged"] for s2, e2 in spans["unmerged"])
    every = [t for arm in ARMS for span in spans[arm] for t in span]
    return {"seconds": both, "of": (max(every) - min(every)) if every else 0.0}
