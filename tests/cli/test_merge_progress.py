"""`mergeserve merge` reports its progress: one log line per shard off a terminal, a tqdm bar on one, and a summary.

The reference for the shard lines is the index the export wrote (which shards exist, and which tensors each holds).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from server.store.checkpoint import TensorSpec, write_sharded
from server.store.progress import ShardProgress
from tests.live_server import REPO

Writer = Callable[[dict[str, Any]], Path]


def test_merge_logs_one_line_per_shard_and_a_summary(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "export"
    argv = ["merge", "--config", str(write_config(tiny_config_data)), "--out", str(out), "--max-shard-size", "40KB"]
    proc = subprocess.run([sys.executable, "-m", "server", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    lines = re.findall(r"export: shard (\d+)/(\d+) (\S+) written", proc.stderr)
    assert lines == [(str(i + 1), str(len(shards)), name) for i, name in enumerate(shards)]
    assert "\r" not in proc.stderr  # no bar redraws in a log
    summary = [line for line in proc.stderr.splitlines() if "export: " in line and "peak memory" in line]
    mb = index["metadata"]["total_size"] / 1e6
    assert len(summary) == 1 and f"{mb:.0f} MB of weights" in summary[0]


def test_on_a_terminal_the_bar_counts_every_byte(tmp_path: Path) -> None:
    specs = [TensorSpec(f"w{i}", (64, 64), torch.float32) for i in range(5)]
    with ShardProgress(sum(s.nbytes for s in specs), terminal=True) as progress:
        write_sharded(tmp_path, specs, lambda s: torch.zeros(s.shape), 40_000, progress)
        assert progress.bar is not None and progress.bar.n == progress.done == 5 * 64 * 64 * 4
