"""The soak script, 60 seconds against the tiny model, as CI runs it.

The tiny model boots in seconds where the demo takes a minute, and what a soak catches here (unanswered requests,
5xx, requests left in flight after clients hang up, memory that grows with traffic) lives in the serving code, not
in the model's size. docs/benchmarks.md reports a 10-minute run against the demo model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CHAT_TEMPLATE  # so /v1/chat/completions is part of the mix too
from tests.live_server import REPO


def test_soak_60s_meets_its_targets(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    base = shutil.copytree(tiny_base, tmp_path / "base")
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config = tmp_path / "soak.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(base), "id": "tiny-llama", "dtype": "float32"},
                "adapters": [{"name": "alpha", "path": str(tiny_adapters["alpha"])}],
                "limits": {"max_input_tokens": 128, "max_total_tokens": 256, "max_batch_size": 4},
            }
        )
    )
    out = tmp_path / "soak.json"
    args = ["--config", str(config), "--clients", "4", "--duration", "60", "--warmup", "15", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "scripts/soak.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if not out.exists():
        pytest.fail(f"soak wrote no summary:\n{proc.stdout}\n{proc.stderr}")
    summary = json.loads(out.read_text())
    assert proc.returncode == 0, summary["targets_missed"]
    assert summary["sent"] == summary["answered"] > 50
    assert set(summary["by_kind"]) == {"generate", "stream", "stream_hangup", "completion", "completion_stream", "chat"}
    assert summary["by_result"].get("hangup", 0) > 0 and summary["in_flight_after"] == 0
    assert summary["rss_growth"] < 0.05 and summary["exit_code"] == 0
    assert len(summary["intervals"]) >= 5
