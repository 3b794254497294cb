"""Boot memory at a real size (issue 27): a 1.07B-parameter Llama-shaped model in bf16 (2.15 GB of safetensors) with a
rank-16 all-linear LoRA, generated at test time by scripts/make_scale_model.py (seeded; about 25 s and 1.5 GiB peak
on the 2-core development machine), booted with the default settings as a user would, each mode in a fresh process.

The bounds are issue 27's, on the process's peak RSS (VmHWM, which counts the memory-mapped weights it touched as
well as its own), against the model's bytes on disk:

- merged, cache miss: <= 1.15x + 1.5 GB (load, merge, element-wise check, parity gate, cache store, prepack);
- merged, cache hit:  <= 1.05x + 1 GB;
- unmerged:           <= 1.1x + 1.5 GB;
- merged with `model.max_memory: {cpu: 512MiB}` and an offload folder (the layers past the cap on disk): <= the
  cap + 1.5 GB and below 0.9x the model's own size, with the in-memory merge's greedy tokens.

Memory is not timing: a bound on it is a property of the product, asserted here. Figures on the development machine
(commit of this test): miss 2.93 GiB, hit 2.81 GiB, unmerged 3.02 GiB for 2.0 GiB of weights; before, 4.94, 4.62 and
5.86 GiB (a packed copy beside the plain weights, a merged twin for the unmerged check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GB = 10**9

CHILD = """
import json, sys
from server.boot.boot import boot
from server.config.load import load_config
from server.rss import peak_rss_bytes
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest
engine = boot(load_config(sys.argv[1]))
info = engine.info
request = PreparedRequest(engine.tokenize("The treasure map shows"), SamplingParams(), 6)
mode = next(iter(engine.arms))
tokens = [t.id for t in engine.generate(request, mode).tokens]
print("RESULT " + json.dumps({"phases": info.boot_peak_rss_bytes, "peak": peak_rss_bytes(), "tokens": tokens,
                              "cache": info.cache.get("status"), "passed": info.parity.passed}))
engine.close()
"""


@pytest.fixture(scope="module")
def scale_1b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("scale") / "1b"
    command = [sys.executable, "scripts/make_scale_model.py", "1b", str(out), "--seed", "0"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600)
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 2.2 GB: pytest keeps its last three runs' temporary folders


def _config(scale: Path, work: Path, mode: str, **model: Any) -> Path:
    data: dict[str, Any] = {
        "model": {"path": str(scale / "base"), "dtype": "bfloat16", "device_map": "auto", **model},
        "adapters": [{"name": "scale", "path": str(scale / "adapter")}],
        "mode": mode,
        "cache": {"dir": str(work / "cache")},
    }
    path = work / f"{mode}{'-capped' if model else ''}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _boot(config: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"boot failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return dict(json.loads(results[-1].removeprefix("RESULT ")))


def _within(result: dict[str, Any], bound: float, what: str) -> None:
    phases = ", ".join(f"{name} {peak / 2**30:.2f}" for name, peak in result["phases"].items())
    assert result["peak"] <= bound, f"{what}: peak RSS {result['peak'] / 2**30:.2f} GiB > {bound / 2**30:.2f} GiB " \
                                    f"(GiB after each phase: {phases})"  # fmt: skip


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # the cache entry and the offloaded layers: 4 GB more


def test_1b_boots_within_the_memory_bounds(scale_1b: Path, work: Path) -> None:
    tmp_path = work
    weights = sum(f.stat().st_size for f in (scale_1b / "base").glob("*.safetensors"))
    assert weights > 2 * GB  # the real size, not a stand-in

    miss = _boot(_config(scale_1b, tmp_path, "merged"))
    assert miss["cache"] == "miss" and miss["passed"]
    _within(miss, 1.15 * weights + 1.5 * GB, "merged, cache miss")
    assert list(miss["phases"])[-1] == "warmup"  # the serving kernels and a warm-up are inside the bound

    hit = _boot(_config(scale_1b, tmp_path, "merged"))
    assert hit["cache"] == "hit" and hit["passed"]
    _within(hit, 1.05 * weights + 1 * GB, "merged, cache hit")

    unmerged = _boot(_config(scale_1b, tmp_path, "unmerged"))
    assert unmerged["passed"]
    _within(unmerged, 1.1 * weights + 1.5 * GB, "unmerged")
    # Each boot touched every weight: a bound met by not loading the model would be no bound.
    assert min(r["peak"] for r in (miss, hit, unmerged)) > weights

    # Issue 27, item 4: capped below the model's size, the layers past the cap go to disk, are merged exactly there
    # (and stay there), and the model is served: slowly, and with less memory than its weights.
    # A cache of its own: the key does not cover placement, and the entry above would make this a hit.
    (tmp_path / "capped").mkdir()
    capped = _boot(_config(scale_1b, tmp_path / "capped", "merged", max_memory={"cpu": "512MiB"},
                           offload_folder=str(tmp_path / "offload")))  # fmt: skip
    assert capped["cache"] == "miss"
    assert capped["passed"] and capped["tokens"] == miss["tokens"]  # the same greedy tokens as in memory
    assert any((tmp_path / "offload" / "merged").iterdir())
    _within(capped, 2**29 + 1.5 * GB, "merged, capped at 512 MiB with disk offload")
    # 0.83x here (1.67 GiB; 0.72x before the gate's extra forward of the base for the adapter check, which reads
    # every offloaded layer once more); before the merge wrote back to disk: > 1.0x.
    assert capped["peak"] < 0.9 * weights
