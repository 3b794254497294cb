"""Benchmark time-to-ready of the demo: plain base load vs cold merge (cache miss) vs cache hit, fresh processes.

Each measurement is its own Python process, so no run profits from another's warm allocator or imports; the figure
is the wall time of the work after imports: `load_base` alone for the plain base, a full `boot()` (merge, parity
gate, cache store, warm-up) with an empty cache for cold, and a full `boot()` against the warm cache for hit. The
three kinds run interleaved, round by round, and each figure is the median over the rounds.

    python scripts/bench_cache.py [--config configs/demo.yaml] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("base", "cold", "hit")


def child(kind: str, config_path: str) -> None:
    from server.boot.boot import boot
    from server.config.load import load_config
    from server.load.adapters import load_base

    config = load_config(config_path)
    start = time.perf_counter()
    if kind == "load_base":
        load_base(config.model)
        phases: dict[str, float] = {}
        status = "base"
    else:
        engine = boot(config)
        phases, status = engine.info.boot_seconds, str(engine.info.cache.get("status"))
        engine.close()
    print(json.dumps({"seconds": time.perf_counter() - start, "phases": phases, "status": status}), flush=True)
    # Skip interpreter teardown: torch's worker threads sometimes abort there ("terminate called without an active
    # exception"), which would fail a run whose figure is already out.
    os._exit(0)


def measure(kind: str, config: str, cache_dir: Path) -> dict[str, object]:
    # PYTHONPATH: the child runs this file as a script, and must import `server` from this checkout.
    env = {**os.environ, "MERGESERVE_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--config", config],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["load_base", "boot"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config)
        return 0
    runs: dict[str, list[dict[str, object]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        warm = Path(tmp) / "warm"
        measure("boot", args.config, warm)  # builds the entry every hit run reuses
        for r in range(args.rounds):
            for kind in KINDS[r % 3 :] + KINDS[: r % 3]:
                cache = Path(tmp) / f"cold-{r}" if kind == "cold" else warm
                result = measure("load_base" if kind == "base" else "boot", args.config, cache)
                assert kind == "base" or result["status"] == ("miss" if kind == "cold" else "hit"), result
                runs[kind].append(result)
                print(f"round {r + 1} {kind}: {result['seconds']:.1f}s", file=sys.stderr)
    med = {k: statistics.median(float(str(x["seconds"])) for x in v) for k, v in runs.items()}
    print("| start | median seconds to ready | vs plain base |\n|---|---:|---:|")
    labels = {"base": "plain base (load_base only)", "cold": "cold: merge at boot (cache miss)", "hit": "cache hit"}
    for kind in KINDS:
        print(f"| {labels[kind]} | {med[kind]:.1f} | {med[kind] / med['base']:.2f} |")
    hit_phases = {p: statistics.median(float(x["phases"][p]) for x in runs["hit"]) for p in runs["hit"][0]["phases"]}  # type: ignore[index]
    print(f"\nhit/plain-base = **{med['hit'] / med['base']:.2f}** (target <= 1.1), median of {args.rounds} rounds; "
          "hit phases: " + ", ".join(f"{p} {s:.1f}s" for p, s in hit_phases.items()))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median_seconds": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
