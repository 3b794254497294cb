"""The CLI timing benchmark runs in the suite and reports its figures (in the test log); times are not asserted.

What is checked is what each timed command answered: 0 for help, version and a good `check`, 2 (one line) for every
config error, so a regression that makes `--help` fail fast cannot pass as a fast `--help`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.live_server import REPO


def test_bench_cli_reports_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_cli.py", "--runs", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with capsys.disabled():
        print(f"\n{proc.stdout}")
    rows = {line[:38].strip(): line[38:].split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert len(rows) == 8
    for label, (code, median, *_) in rows.items():
        expected = "2" if "config error" in label else "0"
        assert code == expected, f"{label}: exit {code}"
        assert float(median) > 0
