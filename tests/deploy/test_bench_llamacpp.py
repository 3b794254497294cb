"""scripts/bench_llamacpp_report.py: the rates, medians, ratios, token agreement and table the benchmark prints.

Pure code, no llama.cpp and no clock: the expected figures are worked out by hand from the inputs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_llamacpp_report import (
    Sample,
    agreement_summary,
    arm_summary,
    leading_agreement,
    median,
    ratio,
    table,
    target_lines,
)


def test_decode_rate_leaves_the_first_token_out() -> None:
    # 33 tokens: the first at 0.5 s, the last at 2.5 s -> 32 tokens in 2 s after the first.
    assert Sample("a", 0, 0, first_s=0.5, last_s=2.5, tokens=33).decode_tokens_per_s == 16.0


def test_decode_rate_is_nan_when_it_cannot_be_timed() -> None:
    assert math.isnan(Sample("a", 0, 0, 0.5, 0.5, 10).decode_tokens_per_s)  # all tokens in one chunk
    assert math.isnan(Sample("a", 0, 0, 0.5, 0.9, 1).decode_tokens_per_s)  # one token: no decode step


def test_median_skips_nan_and_is_nan_when_nothing_is_finite() -> None:
    assert median([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert math.isnan(median([math.nan]))


def test_arm_summary_medians_over_requests() -> None:
    samples = [Sample("a", 0, 0, 0.1, 1.1, 11), Sample("a", 0, 1, 0.3, 2.3, 11), Sample("a", 1, 0, 0.2, 4.2, 9)]
    s = arm_summary(samples)  # rates 10, 5, 2 tokens/s; TTFTs 100, 300, 200 ms
    assert s["requests"] == 3
    assert math.isclose(s["decode_tokens_per_s"], 5.0)
    assert math.isclose(s["ttft_ms"], 200.0)
    assert s["tokens_median"] == 11


def test_ratio_is_ours_over_theirs_and_nan_without_a_reference() -> None:
    assert ratio(30.0, 60.0) == 0.5
    assert math.isnan(ratio(30.0, 0.0))
    assert math.isnan(ratio(math.nan, 60.0))


def test_leading_agreement_counts_until_the_first_difference() -> None:
    assert leading_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert leading_agreement([1, 2], [1, 2, 3]) == 2
    assert leading_agreement([5], [6]) == 0
    summary = agreement_summary([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
    assert summary == {"leading": [3, 1], "of": [3, 2], "min": 1, "identical": 1, "prompts": 2}


def _summaries() -> dict[str, dict[str, float]]:
    row = {"requests": 16, "ttft_ms": 50.0, "tokens_median": 32}
    return {
        "mergeserve float32": {**row, "decode_tokens_per_s": 30.0},
        "mergeserve float16": {**row, "decode_tokens_per_s": 12.0},
        "llama.cpp f16 merged": {**row, "decode_tokens_per_s": 40.0},
        "llama.cpp f16 base + LoRA": {**row, "decode_tokens_per_s": 37.5},
    }


def test_table_has_a_ratio_column_per_llamacpp_row() -> None:
    lines = table({"summaries": _summaries()}).splitlines()
    assert lines[0].count("/ llama.cpp") == 2
    assert len(lines) == 2 + 4
    f32 = next(line for line in lines if line.startswith("| mergeserve float32 "))
    cells = [c.strip() for c in f32.strip("|").split("|")]
    assert cells[3] == "30.0"
    assert cells[-2:] == ["0.75x", "0.80x"]  # 30/40 and 30/37.5


def test_target_lines_judge_each_of_our_rows_against_the_merged_f16_row() -> None:
    lines = target_lines(_summaries(), "llama.cpp f16 merged")
    assert len(lines) == 2
    assert "0.75x" in lines[0] and lines[0].endswith("met)")
    assert "0.30x" in lines[1] and lines[1].endswith("missed)")
    assert target_lines(_summaries(), "absent") == []
