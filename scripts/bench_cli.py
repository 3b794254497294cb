"""Wall time of the CLI's quick answers (--help, --version, `serve --help`, `check --help`, three config errors) and
of `check --config configs/demo.yaml`.

Each command runs as a fresh `python -m server` process (interpreter start-up included, as a user sees it); the
figure is the median of 5 runs after one warm-up run, which fills the OS page cache so the first run's disk reads
do not count. `check` on the demo imports torch (for the merge cache key) and hashes the inputs (remembered in the
cache's file-hashes.json after the first run) and, on a hit, the entry's files; it loads no weights.
`--repo DIR` times another checkout (e.g. an older commit unpacked with `git archive`), for a before and after.

    python scripts/bench_cli.py [--repo DIR] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _configs(folder: Path) -> dict[str, Path]:
    """A bad-YAML file, the demo config with an unknown key (valid otherwise), and a path that does not exist."""
    bad_yaml = folder / "bad.yaml"
    bad_yaml.write_text("model:\n  path: a: b\n")
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for adapter in demo["adapters"]:  # the copy lives elsewhere, so its relative paths must be made absolute
        adapter["path"] = str((REPO / "configs" / adapter["path"]).resolve())
    unknown = folder / "unknown-key.yaml"
    unknown.write_text(yaml.safe_dump({**demo, "servr": {"port": 9000}}))
    return {"bad YAML": bad_yaml, "unknown key": unknown, "missing file": folder / "absent.yaml"}


def _time_once(argv: list[str], repo: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "server", *argv], cwd=repo, env=env, capture_output=True, timeout=300)
    return time.perf_counter() - start, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose `server` package is timed")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command, after one warm-up run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        configs = _configs(Path(tmp))
        commands = {
            "mergeserve --help": ["--help"],
            "mergeserve --version": ["--version"],
            "mergeserve serve --help": ["serve", "--help"],
            "mergeserve check --help": ["check", "--help"],
            **{f"serve, config error: {name}": ["serve", "--config", str(path)] for name, path in configs.items()},
            "mergeserve check --config demo.yaml": ["check", "--config", "configs/demo.yaml"],
        }
        print(f"{'command':<38} {'exit':>4} {'median s':>9} {'min s':>7} {'max s':>7}")
        for label, argv in commands.items():
            _time_once(argv, args.repo.resolve())  # warm-up: page cache and .pyc files
            runs = [_time_once(argv, args.repo.resolve()) for _ in range(args.runs)]
            times = [t for t, _ in runs]
            code = runs[-1][1]
            print(f"{label:<38} {code:>4} {statistics.median(times):>9.2f} {min(times):>7.2f} {max(times):>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
