"""Boot phases of one or more configs, each in a fresh process: seconds and peak RSS (VmHWM) at the end of each
phase, as a multiple of the model's bytes on disk, and the page cache dropped first where this process may (root).

For the memory bounds of issue 27 (merged miss <= 1.15x + 1.5 GB, hit <= 1.05x + 1 GB, unmerged <= 1.1x + 1.5 GB)
on a model of real size (scripts/make_scale_model.py); the serving workload is scripts/bench_scale.py's. Run the
same config twice for a miss and then a hit (give it a cache folder of its own and empty it first).

    python scripts/bench_boot.py CONFIG [CONFIG ...] [--cold] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench_scale_parts import cold_read, drop_page_cache

CHILD = """
import json, sys, time
from server.boot.boot import boot
from server.config.load import load_config
from server.rss import peak_rss_bytes
start = time.perf_counter()
engine = boot(load_config(sys.argv[1]))
seconds = time.perf_counter() - start
info = engine.info
print("RESULT " + json.dumps({"seconds": info.boot_seconds, "peak": info.boot_peak_rss_bytes, "total_s": seconds,
                              "hwm": peak_rss_bytes(), "cache": info.cache.get("status"),
                              "parity": info.parity.summary() if info.parity else None}))
engine.close()
"""


def model_files(config: Path) -> list[Path]:
    import yaml

    path = Path(yaml.safe_load(config.read_text())["model"]["path"])
    path = path if path.is_absolute() else (config.parent / path)
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def boot_once(config: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config)], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{config}: boot failed\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def show(config: Path, weights: int, result: dict[str, Any]) -> None:
    hwm = result["hwm"]
    print(f"\n{config} (cache {result['cache']}): {result['total_s']:.1f} s to ready, peak RSS "
          f"{hwm / 2**30:.2f} GiB = {hwm / weights:.2f}x the {weights / 1e9:.2f} GB of weights")  # fmt: skip
    for phase, seconds in result["seconds"].items():
        peak = result["peak"].get(phase, 0)
        print(f"  {phase:14s} {seconds:8.2f} s   peak so far {peak / 2**30:6.2f} GiB  {peak / weights:5.2f}x")
    print(f"  parity: {result['parity']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each boot (root only)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for config in args.configs:
        files = model_files(config)
        weights = sum(f.stat().st_size for f in files)
        cat = cold_read(files)
        print(f"{config}: cat of the {len(files)} weight files: {cat}")
        dropped = drop_page_cache() if args.cold else False
        result = boot_once(config)
        show(config, weights, result)
        rows.append({"config": str(config), "weights": weights, "cat": cat, "cold": dropped, **result})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
