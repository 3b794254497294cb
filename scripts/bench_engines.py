"""Merged vs unmerged on each engine, in one run: mergeserve's torch engine, its vLLM engine, and vLLM's own server.

Rows (one server at a time, never two sharing the cores; each stopped, its child processes too, before the next):
- mergeserve, vLLM engine: one `ab` server on --vllm-config (configs/demo-vllm.yaml), the arm chosen per request by
  the X-Merge-Mode header. It runs first: its /info `cache` (dir, key) names the merged checkpoint the reference uses.
- vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), the reference, twice: on that merged
  checkpoint (`<cache dir>/entries/<key>`), and on the safetensors base mergeserve's vLLM engine uses (the GGUF
  dequantized into the cache, `entries/base-*`) with the configured adapter as a LoRA (`--enable-lora`). Its engine
  arguments are the ones mergeserve's engine passes for that arm (server.vllm_engine.settings.engine_args:
  enforce_eager, dtype, max_model_len, max_num_seqs, kv_cache_memory_bytes, max_lora_rank, ...) and its environment
  the one mergeserve sets (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU=0, VLLM_HOST_IP=127.0.0.1), so the
  only difference between the two is mergeserve's HTTP layer, metrics and routing.
- mergeserve, torch engine: one `ab` server on --torch-config (configs/demo-ab.yaml), arm by header.

Load, identical for every row: the same chat prompts (scripts/bench_serving.py's 8 long-answer questions, or the
first --prompts of them), greedy (temperature 0), at most --new-tokens, POST /v1/chat/completions with `stream: true`
and `stream_options.include_usage`. At each level C (1 and 8 clients): C warm-up requests per arm, excluded; then
--reps repetitions, each sending every prompt once split evenly over C clients (each client one request after
another; with fewer prompts than clients, as in --quick, prompts repeat so that every client sends one); the arms
of one server alternate repetition by repetition, so slow drift in machine speed hits both.
Per request (client clock): TTFT = send to the first chunk with content; TPOT = (latency - TTFT) / (tokens - 1);
tokens = the final chunk's usage.completion_tokens, counted, never assumed: there is no ignore_eos on our routes,
and the pirate's answers often end at EOS before --new-tokens (the same tokens on every row when the greedy texts
agree). Per repetition: tokens/s = its generated tokens / its wall time.
Reported per row and level: the median tokens/s over repetitions, TTFT p50 and TPOT p50 over all measured requests.
Ratios: merged / unmerged tokens/s per engine and level; mergeserve-vLLM / vLLM's server per arm and level
(target >= 0.9). Greedy texts are compared between mergeserve's vLLM arms and the reference (same prompt, same text).

    python scripts/bench_engines.py [--json out.json] [--markdown] [--quick] [--reps 3] [--levels 1,8]
        [--only vllm,ref-merged,ref-lora,torch]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from ab_load import git_state, heavy_processes
from bench_engines_report import markdown_report, ratios, text_report
from bench_serving import QUESTIONS, assignments, median_ms
from local_server import REPO, LocalServer, free_port

BOOT_TIMEOUT_S, REQUEST_TIMEOUT_S = 900.0, 600.0
STAGES = ("vllm", "ref-merged", "ref-lora", "torch")


@dataclass(frozen=True)
class Arm:
    """One row: which engine, which arm, and how a request selects it (model name, header)."""

    engine: str
    arm: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def row(self) -> str:
        return f"{self.engine}, {self.arm}"


@dataclass
class Sample:
    latency: float
    ttft: float
    tokens: int
    text: str

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(self.tokens - 1, 1)


class VllmServer(LocalServer):
    """vLLM's own OpenAI server as a LocalServer: the same /health polling, log file and SIGTERM stop."""

    def __init__(self, args: list[str], env: dict[str, str], prefix: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix=f"{prefix}-server-{self.port}-", suffix=".log")
        os.close(fd)
        self.log, self.health_history = Path(name), []
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                   "--port", str(self.port), *args]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now (vLLM's EngineCore and workers), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_all(server: LocalServer) -> int:
    """Stop the server, then any of its children that outlived it (by pid), so the next row has the cores alone."""
    below = descendants(server.proc.pid)
    code = server.stop(grace=60)
    deadline = time.monotonic() + 30
    for pid in below:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            print(f"bench_engines: killed leftover child {pid}", file=sys.stderr)
    return code


def others_heavy() -> list[str]:
    """ab_load's heavy processes plus other vLLM processes (engine cores, workers, servers) not started by this run:
    on 2 cores one busy neighbour can cut vLLM's tokens/s several-fold (its OpenMP threads are bound to the cores)."""
    mine = {str(p) for p in descendants(os.getpid())}
    found = [h for h in heavy_processes() if h.split(":")[0] not in mine]
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            cmd = path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if path.parent.name not in mine and ("VLLM::" in cmd or "vllm.entrypoints" in cmd):
                found.append(f"{path.parent.name}: {cmd[:100]}")
    return sorted(set(found))


class Progress:
    """Progress lines with an ETA from the measured seconds per request so far (boots estimated at 90 s each)."""

    def __init__(self, total_requests: int, boots: int) -> None:
        self.total, self.boots, self.done, self.measure_s = total_requests, boots, 0, 0.0
        self.start = time.monotonic()

    def booted(self) -> None:
        self.boots -= 1

    def add(self, requests: int, seconds: float, what: str) -> None:
        self.done += requests
        self.measure_s += seconds
        rest = (self.total - self.done) * self.measure_s / max(self.done, 1) + 90 * self.boots
        elapsed = time.monotonic() - self.start
        print(f"bench_engines: [{self.done}/{self.total} requests] {what}; elapsed {elapsed / 60:.1f} min, "
              f"ETA ~{rest / 60:.1f} min", file=sys.stderr, flush=True)  # fmt: skip


async def chat_one(client: httpx.AsyncClient, arm: Arm, question: str, new_tokens: int) -> Sample:
    body = {"model": arm.model, "messages": [{"role": "user", "content": question}], "temperature": 0.0,
            "max_tokens": new_tokens, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=arm.headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"{arm.row}: HTTP {resp.status_code}: {resp.text[:300]}")
        served = resp.headers.get("x-merge-mode")
        if arm.headers and served != arm.arm:
            raise RuntimeError(f"{arm.row}: the server answered with arm {served}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{arm.row}: error in stream: {chunk['error']}")
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start if ttft is None else ttft
                    parts.append(choice["delta"]["content"])
    if ttft is None or tokens == 0:
        raise RuntimeError(f"{arm.row}: stream ended without content or usage")
    return Sample(time.perf_counter() - start, ttft, tokens, "".join(parts))


async def one_rep(url: str, arm: Arm, questions: list[str], clients: int, new_tokens: int) -> tuple[list, float]:
    """Every question once, split over `clients` clients that each send one request after another."""
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False) as client:

        async def client_loop(indices: list[int]) -> list[tuple[int, Sample]]:
            return [(i, await chat_one(client, arm, questions[i], new_tokens)) for i in indices]

        start = time.perf_counter()
        per_client = [idx for idx in assignments(len(questions), clients, 1) if idx]
        results = await asyncio.gather(*(client_loop(idx) for idx in per_client))
        return [pair for r in results for pair in r], time.perf_counter() - start


async def warm_up(url: str, arm: Arm, questions: list[str], clients: int, new_tokens: int) -> None:
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(chat_one(client, arm, questions[c % len(questions)], new_tokens)
                               for c in range(clients)))  # fmt: skip


def measure(url: str, arms: list[Arm], args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Per arm row: per level, the repetitions' tokens/s, the requests' TTFT and TPOT, and the greedy texts."""
    out: dict[str, Any] = {arm.row: {"engine": arm.engine, "arm": arm.arm, "levels": {}} for arm in arms}
    for clients in args.levels:
        for arm in arms:
            asyncio.run(warm_up(url, arm, args.questions, clients, args.new_tokens))
        got: dict[str, list[tuple[float, list[tuple[int, Sample]]]]] = {arm.row: [] for arm in arms}
        for rep in range(args.reps):
            for arm in arms:
                pairs, wall = asyncio.run(one_rep(url, arm, args.questions, clients, args.new_tokens))
                got[arm.row].append((wall, pairs))
                tps = sum(s.tokens for _, s in pairs) / wall
                progress.add(len(pairs), wall, f"{arm.row}, {clients} client(s), rep {rep + 1}: {tps:.1f} tok/s")
        for arm in arms:
            out[arm.row]["levels"][str(clients)] = summarize(got[arm.row])
    return out


def summarize(reps: list[tuple[float, list[tuple[int, Sample]]]]) -> dict[str, Any]:
    samples = [s for _, pairs in reps for _, s in pairs]
    rates = [sum(s.tokens for _, s in pairs) / wall for wall, pairs in reps]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_reps": rates, "requests": len(samples),
            "tokens": sum(s.tokens for s in samples), "min_tokens": min(s.tokens for s in samples),
            "ttft_p50_ms": median_ms([s.ttft for s in samples]), "tpot_p50_ms": median_ms([s.tpot for s in samples]),
            "texts": {str(i): s.text for i, s in sorted(reps[0][1], key=lambda p: p[0])}}  # fmt: skip


def run_stage(server: LocalServer, arms: list[Arm], args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Boot, /info, measure, stop: this server's rows (with its boot facts) and its /info."""
    try:
        boot = server.wait_healthy(args.boot_timeout)
        progress.booted()
        print(f"bench_engines: {arms[0].engine} healthy after {boot:.0f} s (log {server.log})", file=sys.stderr)
        info = httpx.get(f"{server.url}/info", timeout=10, trust_env=False)
        load, heavy = [os.getloadavg()[0]], set(others_heavy())
        rows = measure(server.url, arms, args, progress)
        load.append(os.getloadavg()[0])
        heavy.update(others_heavy())
    finally:
        code = stop_all(server)
    for row in rows.values():
        row.update(boot_s=boot, log=str(server.log), exit_code=code, load=load, heavy_seen=sorted(heavy))
    return {"rows": rows, "info": info.json() if info.status_code == 200 else None}


def reference_args(config_path: str, info: dict[str, Any]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """vLLM server arguments for the merged and the LoRA reference, from the engine arguments mergeserve's vLLM engine
    passes per arm, and the environment it sets."""
    from server.boot.cached import resolved_dtype
    from server.boot.phases import PhaseTimer
    from server.boot.stored_base import vllm_base
    from server.config.load import load_config
    from server.store.cache import MergeCache
    from server.vllm_engine.settings import ArmPlan, engine_args, environment, memory_shares

    config, _ = resolved_dtype(load_config(config_path))
    if len(config.adapters) != 1 or config.adapters[0].weight != 1.0:
        raise SystemExit(f"bench_engines: {config_path}: the LoRA reference needs one adapter of weight 1")
    adapter = config.adapters[0]
    merged_dir = Path(info["cache"]["dir"]) / "entries" / info["cache"]["key"]
    base_dir = vllm_base(config, MergeCache(Path(info["cache"]["dir"])), PhaseTimer(None))
    rank = int(json.loads((adapter.path / "adapter_config.json").read_text())["r"])
    shares = memory_shares(config, ["merged", "unmerged"] if config.mode == "ab" else [config.mode])
    plans = {"merged": ArmPlan("merged", merged_dir, memory_share=shares.get("merged", 1.0)),
             "unmerged": ArmPlan("base", base_dir, adapter.path, rank, shares.get("unmerged", 1.0))}  # fmt: skip
    out = {}
    for arm, plan in plans.items():
        lora = f"{adapter.name}={plan.adapter_dir}" if plan.adapter_dir is not None else None
        out[arm] = cli_flags(engine_args(config, plan, config.model.dtype), lora)
    return out, environment(config)


def cli_flags(kwargs: dict[str, Any], lora_module: str | None) -> list[str]:
    """vLLM server flags for AsyncEngineArgs keyword arguments (True: a bare flag; None, False: vLLM's default)."""
    flags: list[str] = []
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        flags += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flags + (["--lora-modules", lora_module] if lora_module else [])


def ab_arms(engine: str) -> list[Arm]:
    return [Arm(engine, arm, "pirate", {"X-Merge-Mode": arm}) for arm in ("merged", "unmerged")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The stages in order; the references take their checkpoints from the mergeserve vLLM server's /info."""
    per_stage = {"vllm": 2, "ref-merged": 1, "ref-lora": 1, "torch": 2}
    per_rep = sum(len(idx) for c in args.levels for idx in assignments(len(args.questions), c, 1))
    total = sum(per_stage[s] for s in args.only) * args.reps * per_rep
    progress = Progress(total, len(args.only))
    rows: dict[str, Any] = {}
    infos: dict[str, Any] = {}
    refs: tuple[dict[str, list[str]], dict[str, str]] | None = None
    for stage in args.only:
        if stage in ("vllm", "torch"):
            config, engine = (
                (args.vllm_config, "mergeserve vLLM") if stage == "vllm" else (args.torch_config, "mergeserve torch")
            )
            given = stage == "torch" and args.prefix_cache_tokens is not None  # a torch-engine setting only
            cache = ["--prefix-cache-tokens", str(args.prefix_cache_tokens)] if given else []
            server = LocalServer(config, "--mode", "ab", "--log-level", "warning", *cache,
                                 prefix=f"bench-engines-{stage}")  # fmt: skip
            got = run_stage(server, ab_arms(engine), args, progress)
            infos[engine] = got["info"]
        else:
            if refs is None:
                refs = reference_args(args.vllm_config, infos["mergeserve vLLM"])
            arm = "merged" if stage == "ref-merged" else "unmerged"
            server = VllmServer(refs[0][arm], refs[1], prefix=f"bench-engines-{stage}")
            got = run_stage(server, [Arm("vLLM server", arm, "merged" if arm == "merged" else "pirate")], args,
                            progress)  # fmt: skip
            got["rows"][f"vLLM server, {arm}"]["command_args"] = refs[0][arm]
        rows |= got["rows"]
        if args.json:  # kept if a later stage fails or the run is stopped
            args.json.with_suffix(".partial.json").write_text(json.dumps({"rows": rows, "server_info": infos}))
    if args.json:
        args.json.with_suffix(".partial.json").unlink(missing_ok=True)
    return {"rows": rows, "server_info": infos, "ratios": ratios(rows, args.levels)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--torch-config", default="configs/demo-ab.yaml")
    p.add_argument("--vllm-config", default="configs/demo-vllm.yaml")
    p.add_argument("--levels", default="1,8", help="comma-separated client counts")
    p.add_argument("--reps", type=int, default=3, help="measured repetitions per row and level (after a warm-up)")
    p.add_argument("--prompts", type=int, default=len(QUESTIONS), help=f"how many of the {len(QUESTIONS)} prompts")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 4 prompts, 16 tokens")
    p.add_argument("--only", default=",".join(STAGES), help=f"servers to run, from {','.join(STAGES)}")
    p.add_argument("--boot-timeout", type=float, default=BOOT_TIMEOUT_S)
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--markdown", action="store_true", help="print the report as markdown (default: plain text)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="the torch server's engine.prefix_cache_tokens (0: off); the prompts repeat")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.prompts, args.new_tokens = 1, min(args.prompts, 4), min(args.new_tokens, 16)
    args.levels = sorted({int(x) for x in args.levels.split(",")})
    only = {s.strip() for s in args.only.split(",")}
    if unknown := only - set(STAGES):
        p.error(f"--only: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")
    if only & {"ref-merged", "ref-lora"} and "vllm" not in only:
        p.error("--only: the vLLM server rows take their checkpoints from the mergeserve vLLM row: add vllm")
    args.only = [s for s in STAGES if s in only]
    if args.reps < 1 or not 1 <= args.prompts <= len(QUESTIONS) or args.new_tokens < 2 or min(args.levels) < 1:
        p.error(f"need --reps >= 1, 1 <= --prompts <= {len(QUESTIONS)}, --new-tokens >= 2 and levels >= 1")
    args.questions = list(QUESTIONS[: args.prompts])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = {k: getattr(args, k) for k in ("levels", "reps", "prompts", "new_tokens", "quick", "only",
                                              "torch_config", "vllm_config")}  # fmt: skip
    env: dict[str, Any] = {"cpus": os.cpu_count(), "git": git_state(), "load_before": os.getloadavg(),
                           "heavy_before": others_heavy()}  # fmt: skip
    start = time.monotonic()
    result = {"settings": settings, "environment": env, **run(args)}
    env.update(load_after=os.getloadavg(), heavy_after=others_heavy(), wall_s=time.monotonic() - start)
    print(markdown_report(result) if args.markdown else text_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
