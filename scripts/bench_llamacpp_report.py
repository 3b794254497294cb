"""The pure half of scripts/bench_llamacpp.py: per-request rates, medians, ratios, token agreement and the table.

Nothing here starts a process or reads a clock, so tests/deploy/test_bench_llamacpp.py runs it without llama.cpp.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

TARGET_RATIO = 0.5  # issue #15: our single-stream decode >= 0.5x llama.cpp f16 (measured, never asserted)


@dataclass(frozen=True)
class Sample:
    """One streamed request, on the client clock: seconds to the first and to the last token chunk."""

    arm: str
    rep: int
    prompt: int
    first_s: float
    last_s: float
    tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first / time after the first: prefill (the first token) is left out, so this is the
        decode speed alone; NaN when fewer than 2 tokens came or they came in one chunk."""
        span = self.last_s - self.first_s
        return (self.tokens - 1) / span if self.tokens >= 2 and span > 0 else math.nan


def median(values: list[float]) -> float:
    """Median of the finite values (a NaN rate is a request too short to time); NaN when none is finite."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def arm_summary(samples: list[Sample]) -> dict[str, float]:
    """Medians over every timed request of one arm (all prompts, all repetitions)."""
    return {
        "requests": len(samples),
        "decode_tokens_per_s": median([s.decode_tokens_per_s for s in samples]),
        "ttft_ms": 1000 * median([s.first_s for s in samples]),
        "tokens_median": median([float(s.tokens) for s in samples]),
    }


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 and math.isfinite(theirs) and math.isfinite(ours) else math.nan


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading token ids two greedy outputs share (they must match until a near-tie flips under rounding)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement_summary(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Per prompt: leading agreeing tokens of `other` against `reference` out of the reference's length, and how
    many outputs are identical."""
    leading = [leading_agreement(r, o) for r, o in zip(reference, other, strict=True)]
    identical = sum(r == o for r, o in zip(reference, other, strict=True))
    return {"leading": leading, "of": [len(r) for r in reference], "min": min(leading), "identical": identical,
            "prompts": len(leading)}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per arm, the ratio of each row to each llama.cpp row (ours / theirs, decode tokens/s)."""
    summaries: dict[str, dict[str, float]] = result["summaries"]
    refs = [arm for arm in summaries if arm.startswith("llama.cpp")]
    head = "| arm | requests | gen tokens (median) | decode tokens/s (median) | TTFT ms (median) |"
    rule = "|---|---:|---:|---:|---:|"
    for ref in refs:
        head += f" / {ref} |"
        rule += "---:|"
    lines = [head, rule]
    for arm, s in summaries.items():
        row = (f"| {arm} | {s['requests']} | {s['tokens_median']:.0f} | {s['decode_tokens_per_s']:.1f}"
               f" | {s['ttft_ms']:.1f} |")  # fmt: skip
        for ref in refs:
            row += f" {ratio(s['decode_tokens_per_s'], summaries[ref]['decode_tokens_per_s']):.2f}x |"
        lines.append(row)
    return "\n".join(lines)


def target_lines(summaries: dict[str, dict[str, float]], reference: str) -> list[str]:
    """Each of our arms against the llama.cpp f16 merged row: the #15 target, reported as MET or MISSED."""
    if reference not in summaries:
        return []
    theirs = summaries[reference]["decode_tokens_per_s"]
    out = []
    for arm, s in summaries.items():
        if arm.startswith("mergeserve"):
            r = ratio(s["decode_tokens_per_s"], theirs)
            verdict = "met" if r >= TARGET_RATIO else "missed"
            out.append(f"- {arm}: {r:.2f}x {reference} (target >= {TARGET_RATIO}x: {verdict})")
    return out


def samples_json(samples: list[Sample]) -> list[dict[str, Any]]:
    return [{**asdict(s), "decode_tokens_per_s": s.decode_tokens_per_s} for s in samples]
