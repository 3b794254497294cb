"""The CLI answers --help, --version and config errors without importing torch or transformers.

Each case runs `python -m server ...` in a fresh interpreter through a wrapper that, once the CLI returns or raises
SystemExit, reports which heavy packages ended up in sys.modules. Importing torch, transformers and peft is what made
`--help` take seconds (scripts/bench_cli.py has the figures), so their absence is what these tests check, not a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import REPO

HEAVY = ("torch", "transformers", "peft")
MARK = "CLI-STARTUP-REPORT "
# runpy runs server/__main__.py as `python -m server` would; the report goes out after SystemExit.
WRAPPER = f"""
import json, runpy, sys
sys.argv = ["mergeserve", *sys.argv[1:]]
try:
    runpy.run_module("server", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
sys.stdout.flush()
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print({MARK!r} + json.dumps({{"code": code, "heavy": heavy}}), flush=True)
sys.exit(code)
"""


def run_cli(*argv: str) -> tuple[int, list[str], str, str]:
    """(exit code, heavy modules imported, stdout without the report line, stderr)."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert lines and lines[-1].startswith(MARK), f"no report; stdout={proc.stdout!r} stderr={proc.stderr!r}"
    report = json.loads(lines[-1].removeprefix(MARK))
    assert report["code"] == proc.returncode
    return proc.returncode, report["heavy"], "\n".join(lines[:-1]), proc.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "usage: mergeserve"),
        (["--version"], "mergeserve 0.1.0"),
        (["serve", "--help"], "usage: mergeserve serve"),
        (["merge", "--help"], "usage: mergeserve merge"),
    ],
)
def test_help_and_version_import_no_torch(argv: list[str], expected: str) -> None:
    code, heavy, out, _err = run_cli(*argv)
    assert code == 0 and expected in out
    assert heavy == []


Writer = Callable[[dict[str, Any]], Path]


def _bad_yaml(tmp_path: Path) -> Path:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: a: b\n")  # a second colon on line 2
    return bad


@pytest.mark.parametrize("command", ["serve", "merge"])
@pytest.mark.parametrize("case", ["bad_yaml", "unknown_key", "missing_file"])
def test_config_error_exits_2_with_one_line_and_no_torch(
    command: str, case: str, tmp_path: Path, write_config: Writer, tiny_config_data: dict[str, Any]
) -> None:
    if case == "bad_yaml":
        config, key = _bad_yaml(tmp_path), "line 2"
    elif case == "unknown_key":
        config, key = write_config({**tiny_config_data, "servr": {"port": 9000}}), "servr: unknown key"
    else:
        config, key = tmp_path / "absent.yaml", "(file): cannot read it"
    extra = ["--out", str(tmp_path / "out")] if command == "merge" else []
    code, heavy, _out, err = run_cli(command, "--config", str(config), *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"mergeserve: {config}: ") and key in lines[0] and "fix:" in lines[0]
    assert heavy == []
