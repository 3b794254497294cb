"""`ab_report --arms isolated` keeps one arm in flight at a time; `--arms mixed` puts both in flight at c >= 2.

Checked on the server's side, not with the load generator's own bookkeeping: a real `ab` server on the tiny model
writes down every decode step with its arm (tests/step_recorder.py). The scheduler gives each busy arm one step per
turn, so while both arms hold requests their steps alternate; with one arm alone, its steps come in one unbroken run.
In isolated mode the arm can only change between blocks, so the arm of consecutive steps changes at most
blocks - 1 times; the mixed run on the same server shows that this count does see two arms in flight.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import ab_load
import ab_plots
import ab_report
import ab_stats

LEVEL, PAIRS, TOKENS = 2, 6, 40


def report_on_recorded_server(
    arms: str, folder: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[list[str], dict[str, Any], str, str]:
    """(arm of each decode step in server order, report.json, report.md, console output) of one report run."""
    steps, out = folder / "steps.log", folder / "report"
    env = {**os.environ, "MERGESERVE_STEP_LOG": str(steps)}
    recorder = [sys.executable, "-m", "tests.step_recorder"]
    with LiveServer(config, boot_timeout=120, executable=recorder, env=env) as server:
        # Boot's warm-up may log its last step just after boot: a one-token request (answered from its prefill, no
        # decode step) is served by the model thread only after that, so the steps logged by then are not ours.
        fence = {"inputs": "Arr", "parameters": {"max_new_tokens": 1}}
        assert httpx.post(f"{server.url}/generate", json=fence, timeout=60).status_code == 200
        before = len(steps.read_text().splitlines())
        code = ab_report.main(["--url", server.url, "--arms", arms, "--levels", str(LEVEL), "--requests", str(PAIRS),
                               "--warmup", "0", "--max-new-tokens", str(TOKENS), "--resamples", "2000",
                               "--out", str(out)])  # fmt: skip
    assert code == 0
    lanes = [line.split()[0] for line in steps.read_text().splitlines()[before:]]
    page = (out / "report.md").read_text()
    return lanes, json.loads((out / "report.json").read_text()), page, capsys.readouterr().out


def arm_changes(lanes: list[str]) -> int:
    return sum(a != b for a, b in itertools.pairwise(lanes))


@pytest.fixture
def ab_config(write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]) -> Path:
    tiny_config_data["mode"] = "ab"
    tiny_config_data["limits"] = {"max_input_tokens": 200, "max_total_tokens": 256, "max_new_tokens": TOKENS}
    return write_config(tiny_config_data)


def test_isolated_arms_are_never_in_flight_together(
    ab_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lanes, report, page, console = report_on_recorded_server("isolated", tmp_path, ab_config, capsys)
    blocks = 2 * math.ceil(PAIRS / LEVEL)  # each block: up to LEVEL requests of one arm, waited out
    assert set(lanes) == {"merged", "unmerged"}, lanes
    assert arm_changes(lanes) <= blocks - 1, lanes
    level = report["levels"][str(LEVEL)]
    assert [level["arms"][arm]["n"] for arm in ab_stats.ARMS] == [PAIRS, PAIRS]
    assert level["both_arms_in_flight"]["seconds"] == 0.0
    assert report["settings"]["arms"] == "isolated"
    for text in (page, console):
        assert "Arms: `isolated`" in text and "one arm in flight at a time" in text, text


def test_mixed_arms_are_in_flight_together(ab_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lanes, report, page, console = report_on_recorded_server("mixed", tmp_path, ab_config, capsys)
    blocks = 2 * math.ceil(PAIRS / LEVEL)
    assert arm_changes(lanes) > blocks - 1, lanes  # the server saw both arms' steps interleaved
    assert report["levels"][str(LEVEL)]["both_arms_in_flight"]["seconds"] > 0.0
    assert report["settings"]["arms"] == "mixed"
    for text in (page, console):
        assert "Arms: `mixed`" in text and "both arms are in flight together" in text, text


def test_isolated_blocks_keep_pairs_adjacent_and_swap_the_arm_order() -> None:
    """Pair p's two requests sit in adjacent blocks; the arm that goes first swaps from one pair of blocks to the
    next (merged, unmerged, unmerged, merged, ...), so a steady drift in machine speed favours neither arm."""
    blocks = ab_load.isolated_blocks(level=3, pairs=8)
    assert [arm for arm, _ in blocks] == ["merged", "unmerged", "unmerged", "merged", "merged", "unmerged"]
    assert [pairs for _, pairs in blocks] == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5], [6, 7], [6, 7]]


def test_the_old_phase_option_and_old_reports_still_work() -> None:
    args = ab_report.parse(["--url", "http://127.0.0.1:1", "--phase", "aligned"])
    assert args.arms == "isolated"
    args = ab_report.parse(["--url", "http://127.0.0.1:1", "--phase", "staggered"])
    assert args.arms == "mixed"
    assert ab_report.parse(["--url", "http://127.0.0.1:1"]).arms == "isolated"
    saved = json.loads((Path(__file__).resolve().parents[2] / "docs" / "ab-report" / "report.json").read_text())
    saved.pop("samples")
    assert "Arms: `mixed`" in ab_plots.markdown(saved)  # written as phase `staggered`, before --arms existed
