"""Resident memory of `merged` vs `ab` serving, each booted in a fresh process.

`ab` holds the unmerged PEFT model and a merged twin that shares every tensor the adapters leave alone, so it should
cost about the bytes of the adapted weights (plus the LoRA factors) more than `merged`. The target:
RSS(ab) <= RSS(merged) + adapted bytes + 10 %.

    python scripts/bench_memory.py [--config configs/demo.yaml] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import gc, json, sys
from server.boot.boot import boot
from server.config.load import load_config
from server.merge.apply import lora_layers
config = load_config(sys.argv[1], {"mode": sys.argv[2]})
engine = boot(config)
adapted = 0
for arm in engine.arms.values():
    for _, layer in lora_layers(arm):
        w = layer.get_base_layer().weight
        adapted += w.numel() * w.element_size()
gc.collect()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = lambda key: int(status[key].split()[0]) * 1024
print(json.dumps({"rss": kib("VmRSS"), "peak": kib("VmHWM"), "adapted_bytes": adapted}))
"""


def measure(config: str, mode: str) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", CHILD, config, mode], capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, int]]] = {"merged": [], "ab": []}
    for _ in range(args.repeats):
        for mode in runs:  # interleaved, so drift hits both alike
            runs[mode].append(measure(args.config, mode))
            gc.collect()
    rss = {mode: statistics.median(r["rss"] for r in rs) for mode, rs in runs.items()}
    adapted = runs["ab"][0]["adapted_bytes"]  # the unmerged arm's adapted base weights: what the twin duplicates
    budget = (rss["merged"] + adapted) * 1.10
    mib = 2**20
    print("| mode | median RSS after boot (MiB) | peak RSS (MiB) |")
    print("|---|---:|---:|")
    for mode, rs in runs.items():
        print(f"| {mode} | {rss[mode] / mib:.0f} | {statistics.median(r['peak'] for r in rs) / mib:.0f} |")
    verdict = "PASS" if rss["ab"] <= budget else "MISS"
    print(
        f"\nadapted weights {adapted / mib:.1f} MiB; ab - merged = {(rss['ab'] - rss['merged']) / mib:.1f} MiB; "
        f"budget merged + adapted + 10% = {budget / mib:.0f} MiB: {verdict} ({args.repeats} runs each)"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median_rss": rss, "adapted_bytes": adapted, "pass": verdict}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
