"""A/B report: merged vs unmerged LoRA serving, measured from outside through the TGI streaming API.

Method
  * Arms: one `ab` server, where each request picks its arm with the X-Merge-Mode header (`--url`, or `--config`
    to start one here on a free loopback port), or two single-arm servers (`--merged-url`, `--unmerged-url`).
  * Load: 8 fixed ChatML questions, greedy, a fixed max_new_tokens, streamed from /generate_stream. A "pair" is one
    merged and one unmerged request for the same prompt, so both arms see the same prompts (and, greedy, should
    generate the same tokens). At concurrency c, c workers each send pairs, alternating arms request by request.
    --phase staggered (default): worker w starts on arm w % 2 and runs freely, so at c >= 2 both arms are in flight
    together, the mix a 50/50 A/B deployment sees. --phase aligned: rounds of c requests of one arm, then c of the
    other, so every decode batch holds a single arm. The first --warmup pairs of each level are sent, not counted.
  * Per request (client clock): latency = send to last event; TTFT = send to first token event;
    TPOT = (latency - TTFT) / (tokens - 1).
  * Speed-up of merged = median(unmerged) / median(merged), for TPOT, latency and TTFT (> 1: merged is faster).
    95 % CI by percentile bootstrap: each arm's requests resampled with replacement (--resamples, seed --seed).
    Overall: geometric mean of the per-level ratios, bootstrapped by resampling within each level. A CI that holds
    1 is reported as "no significant difference".

Caveat, measured and stated in the report: an `ab` server runs one decode step per busy arm per scheduler turn, so
with both arms in flight every request waits for the other arm's steps too; at c >= 2 (staggered) the per-arm
figures describe the mixed deployment, not each arm's own speed.

    python scripts/ab_report.py --config configs/demo.yaml --out /tmp/ab-report [--levels 1,2,4] [--requests 24]
    python scripts/ab_report.py --url http://127.0.0.1:8080 ...
    python scripts/ab_report.py --merged-url http://127.0.0.1:8081 --unmerged-url http://127.0.0.1:8082 ...
    python scripts/ab_report.py --sweep ...   (runs scripts/ab_sweep.py; see its docstring)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARMS = ("merged", "unmerged")
QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "What is 12 times 7?",
    "Name three primary colours.",
    "What does a compass do?",
    "Who wrote Romeo and Juliet?",
    "How do plants make their food?",
)
PROMPTS = tuple(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS)
METRICS = ("tpot", "latency", "ttft")
HEAVY = ("bench_serving", "train_demo_adapter", "pytest", "bench_modes", "bench_memory", "server serve", "pip install")
COLORS = {"merged": "tab:blue", "unmerged": "tab:orange"}
CAVEAT = (
    "Method: see the docstring of scripts/ab_report.py. In `staggered` phase at c >= 2 both arms are in flight "
    "together and an ab server runs one decode step per busy arm per turn, so each request also waits for the other "
    "arm's steps: those per-arm figures describe the mixed deployment, and their ratios are pulled towards 1."
)


@dataclass
class Sample:
    """One request as the client saw it; times are perf_counter seconds, made relative to the level's start."""

    level: int
    arm: str
    pair: int
    prompt: int
    warmup: bool
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency": self.latency, "tpot": self.tpot}


# --- servers ---------------------------------------------------------------------------------------------------


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return url.rstrip("/")
    if host == "localhost":
        return url.rstrip("/")
    raise SystemExit(f"ab_report: {url}: only loopback servers may be driven (127.0.0.0/8, ::1, localhost)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"server exited with code {proc.returncode} before /health was 200:\n{last}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return
            time.sleep(1)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s; log {log}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM lets uvicorn shut down cleanly; kill only this process if it has not exited within 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return int(proc.returncode)


@contextlib.contextmanager
def managed_server(config: Path, boot_timeout: float) -> Iterator[tuple[str, Path]]:
    """Start `python -m server serve --mode ab` from the repo root on a free port; yield (url, log); stop it."""
    port = free_port()
    fd, name = tempfile.mkstemp(prefix="ab_report_server_", suffix=".log")
    os.close(fd)
    log = Path(name)
    cmd = [sys.executable, "-m", "server", "serve", "--config", str(Path(config).resolve()), "--host", "127.0.0.1",
           "--port", str(port), "--mode", "ab"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        print(f"ab_report: booting {config} on {url} (log {log})", file=sys.stderr)
        wait_healthy(url, proc, boot_timeout, log)
        yield url, log
    finally:
        print(f"ab_report: server stopped, exit code {stop(proc)}", file=sys.stderr)


@contextlib.contextmanager
def targets(args: argparse.Namespace) -> Iterator[tuple[dict[str, str], Path | None]]:
    """Which URL serves each arm, from the command line."""
    if args.config:
        with managed_server(args.config, args.boot_timeout) as (url, log):
            yield dict.fromkeys(ARMS, url), log
    elif args.url:
        yield dict.fromkeys(ARMS, check_loopback(args.url)), None
    else:
        yield {"merged": check_loopback(args.merged_url), "unmerged": check_loopback(args.unmerged_url)}, None


def server_info(urls: dict[str, str]) -> dict[str, Any]:
    with httpx.Client(trust_env=False, timeout=10) as client:
        return {arm: client.get(f"{url}/info").json() for arm, url in urls.items()}


# --- load --------------------------------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, sample: Sample, max_new_tokens: int) -> None:
    """Stream one request; fill the sample's timings, token count and text (or its error)."""
    body = {"inputs": PROMPTS[sample.prompt],
            "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False, "details": True}}  # fmt: skip
    sample.start = time.perf_counter()
    try:
        async with client.stream(
            "POST", f"{url}/generate_stream", json=body, headers={"X-Merge-Mode": sample.arm}
        ) as r:
            served = r.headers.get("x-merge-mode")
            if r.status_code != 200 or served != sample.arm:
                await r.aread()
                sample.error = f"HTTP {r.status_code}, x-merge-mode {served}: {r.text[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    sample.error = str(event["error"])
                    return
                if sample.ttft is None:
                    sample.ttft = time.perf_counter() - sample.start
                sample.tokens += 1
                if event.get("generated_text") is not None:
                    sample.text = event["generated_text"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        sample.end = time.perf_counter()


def plan(level: int, pairs: int, phase: str) -> list[list[tuple[int, str]]]:
    """Per worker, its (pair, arm) requests: pair p goes to worker p % c; arms alternate inside each worker."""
    workers: list[list[tuple[int, str]]] = [[] for _ in range(level)]
    for p in range(pairs):
        w = p % level
        order = ARMS if phase == "aligned" or w % 2 == 0 else ARMS[::-1]
        workers[w].extend((p, arm) for arm in order)
    return workers


async def run_level(urls: dict[str, str], level: int, args: argparse.Namespace) -> list[Sample]:
    pairs = args.requests + args.warmup
    samples = {(p, arm): Sample(level, arm, p, (p - args.warmup) % len(PROMPTS), p < args.warmup)
               for p in range(pairs) for arm in ARMS}  # fmt: skip
    limits = httpx.Limits(max_connections=2 * level + 2)
    async with httpx.AsyncClient(trust_env=False, timeout=args.request_timeout, limits=limits) as client:

        async def one(key: tuple[int, str]) -> None:
            await send(client, urls[key[1]], samples[key], args.max_new_tokens)

        async def worker(jobs: list[tuple[int, str]]) -> None:
            for key in jobs:
                await one(key)

        t0 = time.perf_counter()
        if args.phase == "aligned":
            for first in range(0, pairs, level):
                for arm in ARMS:
                    await asyncio.gather(*(one((p, arm)) for p in range(first, min(first + level, pairs))))
        else:
            await asyncio.gather(*(worker(jobs) for jobs in plan(level, pairs, args.phase)))
    for s in samples.values():
        s.start, s.end = s.start - t0, s.end - t0
    return list(samples.values())


# --- statistics --------------------------------------------------------------------------------------------------


def measured(samples: list[Sample], level: int | None = None, arm: str | None = None) -> list[Sample]:
    return [
        s for s in samples if not s.warmup and s.error is None and level in (None, s.level) and arm in (None, s.arm)
    ]


def values(samples: list[Sample], level: int, arm: str, metric: str) -> np.ndarray:
    got = [getattr(s, metric) for s in measured(samples, level, arm)]
    return np.array([v for v in got if v is not None], dtype=float)


def boot_medians(x: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    return np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)


def verdict(lo: float, hi: float) -> str:
    if lo <= 1.0 <= hi:
        return "no significant difference"
    return "merged significantly faster" if lo > 1.0 else "unmerged significantly faster"


def summarize(point: float, draws: np.ndarray) -> dict[str, Any]:
    lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    return {"ratio": point, "lo": lo, "hi": hi, "verdict": verdict(lo, hi)}


def speedup(samples: list[Sample], metric: str, levels: list[int], resamples: int, seed: int) -> dict[str, Any]:
    """Median unmerged / median merged per level, plus the geometric mean over levels, each with a bootstrap CI."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    logs: list[tuple[float, np.ndarray]] = []
    for level in levels:
        u, m = values(samples, level, "unmerged", metric), values(samples, level, "merged", metric)
        if len(u) == 0 or len(m) == 0:
            continue
        draws = boot_medians(u, rng, resamples) / boot_medians(m, rng, resamples)
        point = float(np.median(u) / np.median(m))
        out[str(level)] = {**summarize(point, draws), "n_merged": len(m), "n_unmerged": len(u)}
        logs.append((math.log(point), np.log(draws)))
    if len(logs) > 1:
        point = math.exp(sum(p for p, _ in logs) / len(logs))
        out["overall"] = summarize(point, np.exp(sum(d for _, d in logs) / len(logs)))
    return out


def pctl(x: np.ndarray | list[float], q: float = 50) -> float | None:
    return float(np.percentile(x, q)) if len(x) else None


def arm_stats(samples: list[Sample], level: int, arm: str) -> dict[str, Any]:
    ok = measured(samples, level, arm)
    lat = values(samples, level, arm, "latency")
    errors = [s for s in samples if s.level == level and s.arm == arm and s.error is not None]
    return {
        "n": len(ok), "errors": len(errors), "first_error": errors[0].error if errors else None,
        "latency_p50": pctl(lat), "latency_p90": pctl(lat, 90),
        "ttft_p50": pctl(values(samples, level, arm, "ttft")), "tpot_p50": pctl(values(samples, level, arm, "tpot")),
        "stream_tokens_per_s_p50": pctl([s.tokens / s.latency for s in ok]) or 0.0,
        "mean_tokens": float(np.mean([s.tokens for s in ok])) if ok else None,
    }  # fmt: skip


def level_throughput(samples: list[Sample], level: int) -> float | None:
    ok = measured(samples, level)
    if not ok:
        return None
    return sum(s.tokens for s in ok) / (max(s.end for s in ok) - min(s.start for s in ok))


def same_text(samples: list[Sample], level: int) -> tuple[int, int]:
    """Pairs whose merged and unmerged greedy texts are identical, out of complete pairs."""
    by_pair: dict[int, dict[str, str]] = {}
    for s in samples:
        if s.level == level and s.error is None:
            by_pair.setdefault(s.pair, {})[s.arm] = s.text
    full = [p for p in by_pair.values() if len(p) == 2]
    return sum(p["merged"] == p["unmerged"] for p in full), len(full)


def heavy_processes() -> list[str]:
    """Other benchmark/training/test/server processes now running (they share the 2 cores); ours are left out."""
    found, me = [], str(os.getpid())
    for path in sorted(Path("/proc").glob("[0-9]*/cmdline")):
        with contextlib.suppress(OSError, IndexError):
            cmd = path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            parent = (path.parent / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if me not in (path.parent.name, parent) and any(h in cmd for h in HEAVY):
                found.append(f"{path.parent.name}: {cmd[:100]}")
    return found


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain").splitlines()}


# --- plots ---------------------------------------------------------------------------------------------------------


def new_figure(ncols: int, width: float = 5.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def plot_cdf(samples: list[Sample], levels: list[int], out: Path) -> None:
    fig, axes = new_figure(len(levels), 4.5)
    for ax, level in zip(axes, levels, strict=True):
        for arm in ARMS:
            x = np.sort(values(samples, level, arm, "latency"))
            ax.step(x, np.arange(1, len(x) + 1) / max(len(x), 1), where="post", color=COLORS[arm], label=arm)
        ax.set(title=f"concurrency {level}", xlabel="request latency (s)", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Latency CDF per arm")
    fig.savefig(out / "latency_cdf.png", dpi=110)


def plot_ttft_tpot(samples: list[Sample], levels: list[int], out: Path) -> None:
    fig, axes = new_figure(2)
    for ax, metric, label in zip(axes, ("ttft", "tpot"), ("TTFT (ms)", "TPOT (ms per token)"), strict=True):
        for i, arm in enumerate(ARMS):
            data = [values(samples, level, arm, metric) * 1000 for level in levels]
            pos = [k * 3 + i for k in range(len(levels))]
            box = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=True)
            for patch in box["boxes"]:
                patch.set(facecolor=COLORS[arm], alpha=0.6)
            ax.plot([], [], color=COLORS[arm], linewidth=8, alpha=0.6, label=arm)
        ax.set_xticks([k * 3 + 0.5 for k in range(len(levels))], [f"c={level}" for level in levels])
        ax.set(ylabel=label, title=label.split(" (")[0] + " per arm and concurrency")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.savefig(out / "ttft_tpot.png", dpi=110)


def plot_throughput(report: dict[str, Any], out: Path) -> None:
    fig, axes = new_figure(2)
    levels = report["settings"]["levels"]
    for arm in ARMS:
        y = [report["levels"][str(c)]["arms"][arm]["stream_tokens_per_s_p50"] for c in levels]
        axes[0].plot(levels, y, "o-", color=COLORS[arm], label=arm)
    axes[0].set(
        title="Per-stream decode rate (median tokens/s of one request)", xlabel="concurrency", ylabel="tokens/s"
    )
    axes[1].plot(levels, [report["levels"][str(c)]["throughput"] for c in levels], "s-", color="tab:green")
    axes[1].set(title="Server throughput, both arms together", xlabel="concurrency", ylabel="tokens/s")
    for ax in axes:
        ax.set_xticks(levels)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(out / "throughput.png", dpi=110)


def plot_speedup(report: dict[str, Any], out: Path) -> None:
    fig, axes = new_figure(1, 7)
    ax = axes[0]
    for i, metric in enumerate(METRICS):
        rows = report["speedup"][metric]
        keys = list(rows)
        if not keys:
            continue
        x = np.arange(len(keys)) + (i - 1) * 0.22
        y = np.array([rows[k]["ratio"] for k in keys])
        err = np.array([[y[j] - rows[k]["lo"], rows[k]["hi"] - y[j]] for j, k in enumerate(keys)]).T
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=4, label=metric.upper())
        ax.set_xticks(np.arange(len(keys)), [f"c={k}" if k != "overall" else k for k in keys])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set(
        title="Merged speed-up: median unmerged / median merged (95% bootstrap CI)", ylabel="ratio (>1: merged faster)"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.savefig(out / "speedup.png", dpi=110)


# --- report --------------------------------------------------------------------------------------------------------


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def ci_line(metric: str, key: str, r: dict[str, Any]) -> str:
    where = "overall (geometric mean of levels)" if key == "overall" else f"concurrency {key}"
    return (f"- {metric.upper()} {where}: unmerged/merged = **{r['ratio']:.3f}** "
            f"(95% CI {r['lo']:.3f}-{r['hi']:.3f}): {r['verdict']}")  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    st, env = report["settings"], report["environment"]
    lines = ["# A/B report: merged vs unmerged", "",
             f"Source: {report['source']}; git {env['git']['commit'][:10]} ({len(env['git']['dirty'])} dirty files).",
             f"Settings: levels {st['levels']}, {st['requests']} requests per arm per level after {st['warmup']} "
             f"warm-up pairs, max_new_tokens {st['max_new_tokens']}, greedy, phase `{st['phase']}`, "
             f"{st['resamples']} bootstrap resamples (seed {st['seed']}).",
             f"Machine: {env['cpus']} CPUs; 1-min load average {env['load_before'][0]:.2f} before, "
             f"{env['load_after'][0]:.2f} after; other benchmark/training/test processes seen during the run: "
             f"{len(env['heavy_seen'])}{' (see report.json)' if env['heavy_seen'] else ''}.", ""]  # fmt: skip
    info = report["server_info"]
    for arm, i in info.items():
        adapters = ", ".join(f"{a['name']} r={a['rank']} w={a['weight']}" for a in i.get("adapters", []))
        parity = i.get("parity") or {}
        lines.append(f"- server for {arm}: mode {i.get('mode')}, {i.get('dtype')}, adapters [{adapters}], "
                     f"parity max|dlogit| {parity.get('max_abs_diff')}")  # fmt: skip
    lines += ["", "## Per arm and concurrency (client-side, ms)", "",
              "| c | arm | n | errors | latency p50 | latency p90 | TTFT p50 | TPOT p50 | tok/s per stream | "
              "server tok/s | same greedy text (incl. warm-up) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for c in st["levels"]:
        lv = report["levels"][str(c)]
        for arm in ARMS:
            a = lv["arms"][arm]
            lines.append(f"| {c} | {arm} | {a['n']} | {a['errors']} | {ms(a['latency_p50'])} | {ms(a['latency_p90'])} "
                         f"| {ms(a['ttft_p50'])} | {ms(a['tpot_p50'])} | {a['stream_tokens_per_s_p50']:.1f} | "
                         f"{lv['throughput']:.1f} | {lv['same_text'][0]}/{lv['same_text'][1]} pairs |")  # fmt: skip
    lines += ["", "## Speed-up of merged (median unmerged / median merged, 95% bootstrap CI)", ""]
    for metric in METRICS:
        lines += [ci_line(metric, key, r) for key, r in report["speedup"][metric].items()]
    lines += ["", "Plots: latency_cdf.png, ttft_tpot.png, throughput.png, speedup.png.", "", CAVEAT]
    errors = [f"c={c} {arm}: {report['levels'][str(c)]['arms'][arm]['first_error']}"
              for c in st["levels"] for arm in ARMS if report["levels"][str(c)]["arms"][arm]["errors"]]  # fmt: skip
    if errors:
        lines += ["", "## Errors (first per arm and level)", "", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def analyse(samples: list[Sample], args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    return {
        "levels": {str(c): {"arms": {arm: arm_stats(samples, c, arm) for arm in ARMS},
                            "throughput": level_throughput(samples, c) or 0.0,
                            "same_text": same_text(samples, c)} for c in levels},
        "speedup": {m: speedup(samples, m, levels, args.resamples, args.seed) for m in METRICS},
    }  # fmt: skip


def write_outputs(report: dict[str, Any], samples: list[Sample], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    levels = report["settings"]["levels"]
    (out / "report.json").write_text(json.dumps({**report, "samples": [s.as_dict() for s in samples]}, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot_cdf(samples, levels, out)
    plot_ttft_tpot(samples, levels, out)
    plot_throughput(report, out)
    plot_speedup(report, out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(c) for c in args.levels.split(",")]
    settings = {k: getattr(args, k) for k in ("requests", "warmup", "max_new_tokens", "phase", "resamples", "seed")}
    env: dict[str, Any] = {"cpus": os.cpu_count(), "git": git_state(), "load_before": os.getloadavg()}
    heavy: set[str] = set(heavy_processes())
    samples: list[Sample] = []
    with targets(args) as (urls, log):
        info = server_info(urls)
        for level in levels:
            samples += asyncio.run(run_level(urls, level, args))
            heavy.update(heavy_processes())
            Path(args.out).mkdir(parents=True, exist_ok=True)  # kept if a later level fails
            (Path(args.out) / "samples.partial.json").write_text(json.dumps([s.as_dict() for s in samples]))
            print(f"ab_report: level {level} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    env.update(load_after=os.getloadavg(), heavy_seen=sorted(heavy), server_log=str(log) if log else None)
    source = f"ab server started from {args.config}" if args.config else f"{urls}"
    report = {"source": source, "settings": {**settings, "levels": levels}, "environment": env, "server_info": info}
    report.update(analyse(samples, args, levels))
    write_outputs(report, samples, Path(args.out))
    (Path(args.out) / "samples.partial.json").unlink(missing_ok=True)
    return report


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A/B latency report, merged vs unmerged (see the module docstring).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="an ab-mode server (loopback)")
    src.add_argument("--config", help="start an ab server from this config here, on a free port")
    src.add_argument("--merged-url", help="a merged-mode server; needs --unmerged-url")
    p.add_argument("--unmerged-url", help="an unmerged-mode server, with --merged-url")
    p.add_argument("--sweep", action="store_true", help="run the synthetic-adapter sweep (scripts/ab_sweep.py)")
    p.add_argument("--out", default="report", help="output folder")
    p.add_argument("--levels", default="1,2,4", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=24, help="measured requests per arm per level")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per arm per level, not counted")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--phase", choices=["staggered", "aligned"], default="staggered")
    p.add_argument("--resamples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boot-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if bool(args.merged_url) != bool(args.unmerged_url):
        p.error("--merged-url and --unmerged-url go together")
    if args.resamples < 2000 or args.requests < 2:
        p.error("need --resamples >= 2000 and --requests >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import ab_sweep

        return ab_sweep.main([a for a in argv if a != "--sweep"])
    report = run(parse(argv))
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
