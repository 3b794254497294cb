"""Peak memory of `mergeserve merge` on the demo, against the size of the model it writes.

Each export runs as its own process; the figure is the one the command logs: VmHWM at the end minus VmRSS when the
export starts (after imports), with VmHWM reset at that start through /proc/self/clear_refs. Three cases:
the GGUF demo base to float32 and to float16, and a float32 safetensors base (the float32 export itself, with the
pirate adapter applied again) to float16: the case where holding the model in float32 would cost 2x the output.

    python scripts/bench_export.py [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"export: .*?, (\w+), (\d+) MB of weights, peak memory above baseline (\d+) MB \(([\d.]+)x")


def export(config: Path, out: Path, dtype: str) -> tuple[str, int, int, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "server", "merge", "--config", str(config), "--out", str(out), "--dtype", dtype],
        cwd=REPO, capture_output=True, text=True, timeout=1200, check=True,
    )  # fmt: skip
    m = LINE.search(proc.stderr)
    assert m, proc.stderr[-2000:]
    return m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        rows.append(("GGUF (Q4_1, dequantized to float32)", *export(args.config, root / "f32", "float32")))
        rows.append(("GGUF (Q4_1, dequantized to float32)", *export(args.config, root / "f16", "float16")))
        data = yaml.safe_load(args.config.read_text())
        data["model"]["path"] = str(root / "f32")
        for adapter in data["adapters"]:
            adapter["path"] = str((args.config.parent / adapter["path"]).resolve())
        (root / "f32.yaml").write_text(yaml.safe_dump(data))
        rows.append(("float32 safetensors", *export(root / "f32.yaml", root / "f32-to-f16", "float16")))
    print("| stored base | output dtype | model size (MB) | peak above baseline (MB) | ratio |")
    print("|---|---|---:|---:|---:|")
    for base, dtype, size, peak, ratio in rows:
        print(f"| {base} | {dtype} | {size} | {peak} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
