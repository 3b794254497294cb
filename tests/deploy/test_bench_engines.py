"""scripts/bench_engines.py: the reference server gets our vLLM engine's arguments, and the ratios it prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from server.config.load import load_config
from server.vllm_engine.settings import ArmPlan, engine_args

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_engines
import bench_engines_report

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_reference_flags_give_vllm_the_engine_arguments_of_our_arm(arm: str) -> None:
    """vLLM's own argument parser, given the flags, yields the engine arguments mergeserve's vLLM arm uses: the
    comparison with vLLM's server differs only in the HTTP layer."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    config = load_config(REPO / "configs" / "demo-vllm.yaml")
    adapter = REPO / "configs" / "adapters" / "pirate"
    plan = ArmPlan(arm, Path("/models/merged"), memory_share=0.5)
    if arm == "unmerged":
        plan = ArmPlan("base", Path("/models/base"), adapter, 8, 0.5)
    kwargs = engine_args(config, plan, "float32")
    lora = f"pirate={adapter}" if arm == "unmerged" else None
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(bench_engines.cli_flags(kwargs, lora))
    got = AsyncEngineArgs.from_cli_args(parsed)
    for key, value in kwargs.items():
        want = [value] if key == "served_model_name" else value
        assert getattr(got, key) == want, key
    assert got.enforce_eager and got.kv_cache_memory_bytes == 1 << 30  # demo-vllm: 2 GiB split between the arms
    modules = parsed.lora_modules or []
    assert [(m.name, m.path) for m in modules] == ([("pirate", str(adapter))] if lora else [])


def row(engine: str, arm: str, rates: dict[int, float], texts: list[str]) -> dict[str, Any]:
    levels = {str(c): {"tokens_per_s": r, "ttft_p50_ms": 100.0, "tpot_p50_ms": 50.0, "min_tokens": 64,
                       "texts": dict(enumerate(texts))} for c, r in rates.items()}  # fmt: skip
    levels = {c: {**lv, "texts": {str(k): v for k, v in lv["texts"].items()}} for c, lv in levels.items()}
    return {"engine": engine, "arm": arm, "levels": levels, "load": [1.0, 1.0], "heavy_seen": []}


def test_ratios_divide_the_right_rows() -> None:
    texts = ["a", "b", "c"]
    rows = {f"{e}, {a}": row(e, a, rates, t) for e, a, rates, t in [
        ("mergeserve torch", "merged", {1: 9.0, 8: 30.0}, texts),
        ("mergeserve torch", "unmerged", {1: 10.0, 8: 24.0}, texts),
        ("mergeserve vLLM", "merged", {1: 13.5, 8: 36.0}, texts),
        ("mergeserve vLLM", "unmerged", {1: 4.0, 8: 16.0}, ["a", "x", "c"]),
        ("vLLM server", "merged", {1: 15.0, 8: 40.0}, texts),
        ("vLLM server", "unmerged", {1: 5.0, 8: 16.0}, texts),
    ]}  # fmt: skip
    r = bench_engines_report.ratios(rows, [1, 8])
    assert r["merged_over_unmerged"]["mergeserve torch"] == {"1": pytest.approx(0.9), "8": pytest.approx(1.25)}
    assert r["merged_over_unmerged"]["vLLM server"] == {"1": pytest.approx(3.0), "8": pytest.approx(2.5)}
    assert r["vllm_engine_over_reference"]["merged"] == {"1": pytest.approx(0.9), "8": pytest.approx(0.9)}
    assert r["vllm_engine_over_reference"]["unmerged"] == {"1": pytest.approx(0.8), "8": pytest.approx(1.0)}
    assert r["same_text_as_reference"] == {"merged": [3, 3], "unmerged": [2, 3]}
    result = {"settings": {"levels": [1, 8], "prompts": 3, "new_tokens": 64, "reps": 3, "quick": False},
              "environment": {"cpus": 2, "load_before": (1.0,), "load_after": (1.0,), "heavy_before": [],
                              "heavy_after": [], "git": {"commit": "0" * 40, "dirty": []}, "wall_s": 60.0},
              "rows": rows, "ratios": r}  # fmt: skip
    page = bench_engines_report.markdown_report(result)
    assert "- unmerged: 0.80 MISS at 1 client, 1.00 PASS at 8 clients" in page
    assert "| mergeserve torch, merged | 9.0 | 100 | 50 | 30.0 | 100 | 50 |" in page
    table = [line.split(" | ")[0] for line in page.splitlines() if line.startswith("| m") or line.startswith("| v")]
    assert table == ["| mergeserve torch, merged", "| mergeserve torch, unmerged", "| mergeserve vLLM, merged",
                     "| mergeserve vLLM, unmerged", "| vLLM server, merged", "| vLLM server, unmerged"]  # fmt: skip
