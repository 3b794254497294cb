"""Real scale, one run: boot each mode on a Llama-shaped model of real size, its peak RSS and boot phases, and the
same OpenAI workload on mergeserve, vLLM's own server and llama.cpp, on the same weights.

The model comes from `scripts/make_scale_model.py SHAPE DIR` (DIR/base, DIR/adapter). Rows, one server at a time
(never two sharing the cores or the memory), each stopped with its children before the next:
- mergeserve torch engine: `merged` with an empty merge cache (a miss: load, merge, check, store), `merged` again
  (a hit), `unmerged`, and `ab` (arm by the X-Merge-Mode header). A mode the server refuses at boot (`ab` at the 8B
  shape does not fit 24 GB) is a row with its one-line refusal.
- vLLM's own OpenAI server (`--vllm`) on the merged checkpoint the miss stored in the cache entry.
- llama.cpp (`--llama-python`, `--llama-src`): llama-cpp-python's server on that checkpoint converted to an f16 GGUF
  by llama.cpp's convert_hf_to_gguf.py (one rounding, bf16 -> f16).
Per row: seconds to healthy, /info's boot phases (seconds, and the peak RSS at each phase's end), the server's own
peak RSS (VmHWM, polled; its children summed too, for vLLM) over boot and workload, as a multiple of the model's bytes.

Machine figures first: `cat` of the weight files with the page cache dropped (root only; said when not), and the
weight-read bound (scripts/bench_scale_parts.py): tokens/s no decode step can beat at batch 1.

Workload, identical for every row: the 8 chat questions of scripts/bench_serving.py, POST /v1/chat/completions,
non-streamed, temperature 0, max_tokens --new-tokens; tokens counted from usage.completion_tokens (random weights rarely
stop early, but nothing is assumed). At each level C (1 and 8 clients): C warm-up requests (excluded), then --reps
repetitions, each sending every question once split over C clients; tokens/s per repetition = its tokens / its wall
time; the median is reported, with the ratio to llama.cpp, to vLLM's server and (1 client) to the read bound.

    python scripts/bench_scale.py DIR [--dtype bfloat16] [--modes merged,hit,unmerged,ab] [--vllm]
        [--llama-python P --llama-src S] [--levels 1,8] [--reps 3] [--new-tokens 32] [--json F] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from ab_load import git_state
from bench_engines import VllmServer, stop_all
from bench_scale_parts import PeakWatcher, cold_read, read_bound
from bench_scale_report import write_markdown
from bench_serving import QUESTIONS, assignments
from local_server import LocalServer

BOOT_TIMEOUT_S, REQUEST_TIMEOUT_S = 3600.0, 1800.0
MODES = ("merged", "hit", "unmerged", "ab")


def write_config(shape_dir: Path, work: Path, dtype: str) -> Path:
    data = {
        "model": {"path": str(shape_dir / "base"), "dtype": dtype},
        "adapters": [{"name": "scale", "path": str(shape_dir / "adapter")}],
        "mode": "merged",
        "cache": {"dir": str(work / "cache")},
        "limits": {"max_input_tokens": 1024, "max_total_tokens": 2048, "max_new_tokens": 256},
    }
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _chat(client: httpx.AsyncClient, model: str, headers: dict[str, str], question: str, tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0.0,
            "max_tokens": tokens}  # fmt: skip
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
    return int(resp.json()["usage"]["completion_tokens"])


async def _rep(
    url: str, model: str, headers: dict[str, str], clients: int, tokens: int, warm: bool
) -> tuple[int, float]:
    """(tokens, wall seconds) of every question once over `clients` clients; a warm-up sends one per client."""
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False) as client:

        async def loop(indices: list[int]) -> int:
            return sum([await _chat(client, model, headers, QUESTIONS[i], tokens) for i in indices])

        per_client = [[c % len(QUESTIONS)] for c in range(clients)] if warm else [
            idx for idx in assignments(len(QUESTIONS), clients, 1) if idx]  # fmt: skip
        start = time.perf_counter()
        counts = await asyncio.gather(*(loop(idx) for idx in per_client))
        return sum(counts), time.perf_counter() - start


def workload(url: str, model: str, headers: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clients in args.levels:
        asyncio.run(_rep(url, model, headers, clients, args.new_tokens, warm=True))
        reps = [asyncio.run(_rep(url, model, headers, clients, args.new_tokens, warm=False)) for _ in range(args.reps)]
        rates = [tokens / wall for tokens, wall in reps]
        out[str(clients)] = {"tokens_per_s": statistics.median(rates), "reps": rates, "tokens": [t for t, _ in reps]}
        print(f"bench_scale:   {clients} client(s): {statistics.median(rates):.2f} tok/s", file=sys.stderr, flush=True)
    return out


def refusal(server: LocalServer) -> str:
    lines = [line for line in server.read_log().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {server.proc.returncode}"


def run_row(name: str, server: LocalServer, model: str | None, headers: dict[str, str], args: argparse.Namespace,
            ) -> dict[str, Any]:  # fmt: skip
    print(f"bench_scale: {name}: booting (log {server.log})", file=sys.stderr, flush=True)
    watcher = PeakWatcher(server.proc.pid)
    row: dict[str, Any] = {"row": name, "log": str(server.log)}
    try:
        row["boot_s"] = server.wait_healthy(BOOT_TIMEOUT_S)
        info = httpx.get(f"{server.url}/info", timeout=30, trust_env=False)
        row["info"] = info.json() if info.status_code == 200 and "boot_seconds" in info.text else None
        row["boot_peak"] = watcher.peaks.get(server.proc.pid)
        if model is None:
            model = httpx.get(f"{server.url}/v1/models", timeout=30, trust_env=False).json()["data"][0]["id"]
        row["levels"] = workload(server.url, model, headers, args)
    except RuntimeError as exc:  # the process ended during boot: a refusal (its last log line) or a crash
        row["refused"] = refusal(server) if server.proc.poll() is not None else str(exc)
    finally:
        row["exit_code"] = stop_all(server)
        row["peak"] = watcher.stop()
    return row


def mergeserve_rows(config: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode in args.modes:
        serve_mode = "merged" if mode == "hit" else mode
        server = LocalServer(config, "--mode", serve_mode, "--log-level", "info", prefix=f"bench-scale-{mode}")
        headers = {"X-Merge-Mode": "merged"} if mode == "ab" else {}
        name = {"merged": "merged (cache miss)", "hit": "merged (cache hit)", "ab": "ab (merged arm)"}.get(mode, mode)
        rows.append(run_row(f"mergeserve torch, {name}", server, None, headers, args))
    return rows


def merged_entry(rows: list[dict[str, Any]]) -> Path | None:
    for row in rows:
        cache = (row.get("info") or {}).get("cache") or {}
        if cache.get("key"):
            return Path(cache["dir"]) / "entries" / cache["key"]
    return None


def reference_rows(entry: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    if args.vllm:
        flags = ["--model", str(entry), "--dtype", args.dtype, "--max-model-len", "2048", "--served-model-name", "m"]
        server = VllmServer(flags, {"VLLM_CPU_KVCACHE_SPACE": "2"}, prefix="bench-scale-vllm")
        rows.append(run_row("vLLM's own server, merged", server, "m", {}, args))
    if args.llama_python and args.llama_src:
        from bench_llamacpp import LlamaServer, convert

        gguf = work / "merged-f16.gguf"
        if not gguf.exists():
            subprocess.run(convert(args.llama_src, "convert_hf_to_gguf.py", entry, "--outtype", "f16", "--outfile",
                                   gguf), check=True, capture_output=True)  # fmt: skip
        llama = LlamaServer(args.llama_python, gguf, None, threads=args.threads)
        rows.append(run_row("llama.cpp f16, merged", llama, "m", {}, args))
    return rows


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {int(mem) / 2**20:.1f} GiB"


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(args.dir, work, args.dtype)
    files = sorted((args.dir / "base").glob("*.safetensors"))
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result: dict[str, Any] = {"shape_dir": str(args.dir), "git": git_state(), "machine": machine(), "date": date,
                              "dtype": args.dtype}  # fmt: skip
    result["cold_read"] = cold_read(files)
    result["read_bound"] = read_bound(files)
    print(f"bench_scale: cat {result['cold_read']['seconds']:.1f} s, read bound "
          f"{result['read_bound']['bytes_per_s'] / 1e9:.1f} GB/s", file=sys.stderr, flush=True)  # fmt: skip
    rows = mergeserve_rows(config, args)
    entry = merged_entry(rows)
    if entry is not None:
        rows += reference_rows(entry, work, args)
    result["rows"] = rows
    return result


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("dir", type=Path, help="a make_scale_model.py output (DIR/base, DIR/adapter)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {','.join(MODES)}")
    p.add_argument("--vllm", action="store_true", help="also vLLM's own server on the merged checkpoint")
    p.add_argument("--llama-python", help="a python with llama_cpp.server (scripts/bench_llamacpp.py says how)")
    p.add_argument("--llama-src", type=Path, help="llama.cpp's source tree (for convert_hf_to_gguf.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--levels", default="1,8")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work-dir", type=Path, help="default: DIR/bench (its cache is emptied first)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(unknown)}; choose from {','.join(MODES)}")
    args.levels = [int(level) for level in args.levels.split(",")]
    args.work_dir = args.work_dir or args.dir / "bench"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if "merged" in args.modes:  # the miss must be a miss
        subprocess.run(["rm", "-rf", str(args.work_dir / "cache")], check=True)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    table = write_markdown(result, args.markdown)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
