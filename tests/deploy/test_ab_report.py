"""The A/B report's statistics and outputs, on synthetic samples whose true speed-up is known."""

from __future__ import annotations

import ast
import contextlib
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from server.config.load import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import ab_load
import ab_plots
import ab_report
import ab_stats
import ab_sweep

REPO = Path(__file__).resolve().parents[2]


def synthetic(tpot: dict[str, float], n: int, levels: list[int], seed: int = 0) -> list[ab_stats.Sample]:
    """n requests per arm and level with 20 tokens each, TTFT 50 ms and TPOT drawn around the arm's mean (±10%)."""
    rng = np.random.default_rng(seed)
    samples = []
    for level in levels:
        t = 0.0
        for pair in range(n):
            for arm in ab_stats.ARMS:
                per_token = tpot[arm] * rng.uniform(0.9, 1.1)
                s = ab_stats.Sample(level, arm, pair, pair % 8, warmup=False, start=t, ttft=0.05, tokens=20)
                s.queue = 0.01 * rng.uniform(0.5, 1.5)
                s.end = t + 0.05 + 19 * per_token
                s.text = f"answer {pair}"
                samples.append(s)
                t = s.end
    return samples


def synthetic_report(
    samples: list[ab_stats.Sample], args: Any, levels: list[int], info: dict[str, Any]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "source": "synthetic",
        "settings": {"requests": 12, "warmup": 0, "max_new_tokens": 20, "phase": "staggered", "resamples": 2000,
                     "seed": 0, "levels": levels},
        "environment": {"cpus": 2, "git": {"commit": "0" * 40, "dirty": []}, "load_before": (0.1, 0, 0),
                        "load_after": (0.2, 0, 0), "heavy_seen": []},
        "server_info": {"merged": {**info, "parity": {"max_abs_diff": 0}}},
    }  # fmt: skip
    report.update(ab_report.analyse(samples, args, levels))
    return report


def test_speedup_finds_a_real_difference() -> None:
    samples = synthetic({"merged": 0.020, "unmerged": 0.030}, 30, [1, 2])
    result = ab_stats.speedup(samples, "tpot", [1, 2], resamples=2000, seed=0)
    for key in ("1", "2", "overall"):
        assert 1.4 < result[key]["ratio"] < 1.6
        assert result[key]["lo"] > 1.0
        assert result[key]["verdict"] == "merged significantly faster"


def test_speedup_says_plainly_when_the_interval_holds_one() -> None:
    samples = synthetic({"merged": 0.020, "unmerged": 0.020}, 30, [1])
    result = ab_stats.speedup(samples, "tpot", [1], resamples=2000, seed=0)["1"]
    assert result["lo"] <= 1.0 <= result["hi"]
    assert result["verdict"] == "no significant difference"


def test_warmup_and_failed_requests_are_not_counted() -> None:
    samples = synthetic({"merged": 0.02, "unmerged": 0.02}, 4, [1])
    samples[0].warmup = True
    samples[1].error = "HTTP 503"
    stats = {arm: ab_stats.arm_stats(samples, 1, arm) for arm in ab_stats.ARMS}
    assert stats["merged"]["n"] == 3 and stats["unmerged"]["n"] == 3
    assert stats["unmerged"]["errors"] == 1 and stats["unmerged"]["first_error"] == "HTTP 503"


def test_queue_means_are_per_level_differences() -> None:
    before = {"merged": (1.0, 10.0), "unmerged": (2.0, 10.0)}
    after = {"merged": (1.5, 20.0), "unmerged": (2.0, 10.0)}
    means = ab_report.queue_means(before, after)
    assert means["merged"] == {"n": 10.0, "mean": pytest.approx(0.05)}
    assert means["unmerged"] == {"n": 0.0, "mean": None}


def test_report_files_are_written(tmp_path: Path) -> None:
    levels = [1, 2]
    samples = synthetic({"merged": 0.020, "unmerged": 0.025}, 12, levels)
    args = ab_report.parse(["--url", "http://127.0.0.1:1", "--levels", "1,2", "--resamples", "2000"])
    report = synthetic_report(samples, args, levels, {"mode": "ab", "dtype": "float32", "adapters": []})
    report["levels"]["1"]["queue"] = {"merged": {"n": 12, "mean": 0.001}, "unmerged": {"n": 12, "mean": 0.003}}
    ab_plots.write_outputs(report, samples, tmp_path)
    for name in ("report.md", "report.json", "latency_cdf.png", "ttft_tpot.png", "throughput.png", "speedup.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    page = (tmp_path / "report.md").read_text()
    assert "| no bias detected | 1.0 / 3.0 |" in page  # the queue table: equal synthetic queues; /metrics means in ms
    ratio = re.search(
        r"TPOT concurrency 1: unmerged/merged = \*\*(1\.\d{3})\*\* \(95% CI (1\.\d{3})-(\d\.\d{3})\)", page
    )
    assert ratio, page
    assert 1.0 < float(ratio[2]) < float(ratio[1]) < float(ratio[3])  # a true 1.25x, found with its CI above 1
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved["samples"]) == len(samples)
    assert saved["levels"]["2"]["same_text"] == [12, 12]
    again = ab_report.reanalyse(tmp_path, args)  # from report.json alone: same statistics, queue table kept
    assert again["speedup"] == json.loads(json.dumps(report["speedup"]))
    assert again["levels"]["1"]["queue"] == report["levels"]["1"]["queue"]


def test_report_names_the_engine_and_its_caveat() -> None:
    """On the vLLM engine the two arms are two vLLM engines sharing the cores, not one loop taking turns: the page
    says which engine served and gives that engine's caveat (from /info's `engine`, or its vLLM boot phases)."""
    samples = synthetic({"merged": 0.020, "unmerged": 0.025}, 4, [1])
    args = ab_report.parse(["--url", "http://127.0.0.1:1", "--levels", "1", "--resamples", "2000"])
    pages = {}
    for kind, info in (("torch", {"boot_seconds": {"merge": 1.0}}), ("vllm", {"engine": {"kind": "vllm"}}),
                       ("vllm-phases", {"boot_seconds": {"vllm_start": 9.0}})):  # fmt: skip
        pages[kind] = ab_plots.markdown(synthetic_report(samples, args, [1], {"mode": "ab", **info}))
    assert "engine torch" in pages["torch"] and "one decode step per busy arm" in pages["torch"]
    for kind in ("vllm", "vllm-phases"):
        assert "engine vllm" in pages[kind] and "two vLLM engines" in pages[kind], pages[kind]
        assert "one decode step per busy arm" not in pages[kind]


def test_pairs_cancel_the_spread_between_prompts() -> None:
    """Answer lengths vary 8x between prompts and unmerged is 5% slower on each pair: the paired CI excludes 1."""
    rng = np.random.default_rng(1)
    samples = []
    for pair in range(24):
        tokens = [8, 16, 32, 64][pair % 4]
        for arm, slower in (("merged", 1.0), ("unmerged", 1.05)):
            s = ab_stats.Sample(1, arm, pair, pair % 8, warmup=False, ttft=0.05, tokens=tokens)
            s.end = 0.05 + tokens * 0.02 * slower * rng.uniform(0.99, 1.01)
            samples.append(s)
    paired = ab_stats.speedup(samples, "latency", [1], resamples=2000, seed=0)["1"]
    assert paired["lo"] > 1.0 and paired["pairs"] == 24
    unpaired = [np.median(ab_stats.values(samples, 1, arm, "latency")) for arm in ("unmerged", "merged")]
    assert unpaired[0] / unpaired[1] == pytest.approx(paired["ratio"], abs=0.05)  # same effect, seen either way


def test_queue_bias_is_measured_with_its_interval() -> None:
    samples = synthetic({"merged": 0.02, "unmerged": 0.02}, 30, [1])
    fair = ab_stats.queue_bias(samples, 1, resamples=2000, seed=0)
    assert fair["lo"] <= 0.0 <= fair["hi"] and fair["verdict"] == "no bias detected"
    for s in samples:
        if s.arm == "unmerged" and s.queue is not None:
            s.queue += 0.05  # every unmerged request waits 50 ms longer
    biased = ab_stats.queue_bias(samples, 1, resamples=2000, seed=0)
    assert biased["verdict"] == "unmerged waits longer" and 0.04 < biased["diff"] < 0.06 and biased["lo"] > 0


def _sibling_imports(path: Path, siblings: set[str]) -> set[str]:
    """The scripts/ modules that `path` imports, at module level or inside a function (a lazy import still cycles)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found & siblings


def test_scripts_import_each_other_without_a_circle() -> None:
    scripts = Path(ab_report.__file__).resolve().parent
    siblings = {p.stem for p in scripts.glob("*.py")}
    graph = {name: _sibling_imports(scripts / f"{name}.py", siblings) for name in siblings}
    assert "ab_sweep" in graph["ab_report"]  # `ab_report.py --sweep` still runs the sweep
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_sweep_configs_keep_the_engine_and_limits_of_the_given_config(tmp_path: Path) -> None:
    """`ab_report --sweep --config configs/demo-vllm.yaml` sweeps on vLLM: every combination's config keeps the
    engine section (and limits, cache), only adapters, mode and server are the sweep's own."""
    given = yaml.safe_load((REPO / "configs" / "demo-vllm.yaml").read_text())
    shutil.copytree(REPO / "configs" / "adapters" / "pirate", tmp_path / "adapters" / "r8_0")  # any saved LoRA
    path = ab_sweep.write_config(ab_sweep.base_sections(REPO / "configs" / "demo-vllm.yaml"), tmp_path / "adapters",
                                 8, 1, tmp_path / "c.yaml")  # fmt: skip
    written = yaml.safe_load(path.read_text())
    assert written["engine"] == given["engine"] and written["limits"] == given["limits"]
    assert written["mode"] == "ab" and [a["name"] for a in written["adapters"]] == ["r8_0"]
    assert load_config(path).engine.kind == "vllm"


def test_sweep_records_a_combination_the_server_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM takes at most rank 512 as one LoRA, so rank 256 x 4 adapters is refused at boot: the sweep goes on and
    its page says so instead of stopping."""

    @contextlib.contextmanager
    def refusing(config: Path, boot_timeout: float) -> Iterator[tuple[str, Path]]:
        raise ab_load.BootFailed(2, "config.yaml: adapters: rank 1024 above vLLM's largest max_lora_rank 512")
        yield  # pragma: no cover

    monkeypatch.setattr(ab_load, "managed_server", refusing)
    args = ab_sweep.parse(["--out", str(tmp_path)])
    row, samples = ab_sweep.run_combo(tmp_path / "c.yaml", 256, 4, args)
    assert samples == [] and row["refused"].startswith("exit 2: config.yaml: adapters: rank 1024")
    page = ab_sweep.markdown([row], {})
    assert "| 256 | 4 | refused at boot (exit 2: config.yaml" in page


def test_progress_names_level_and_arm_with_an_eta(capsys: pytest.CaptureFixture[str]) -> None:

    progress = ab_load.Progress(total=4)
    progress.start -= 6.0  # six seconds in, so the pace is 3 s per request after two
    progress.step(ab_stats.Sample(level=2, arm="merged", pair=0, prompt=0, warmup=False))
    progress.step(ab_stats.Sample(level=2, arm="unmerged", pair=0, prompt=0, warmup=False))
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("ab_report: level 2, unmerged arm: 2/4 requests, 0.1 min elapsed, ETA ~0.1 min")
    assert "1/4 requests" in lines[0] and "merged arm" in lines[0]
