"""Soak test: N concurrent clients mix every generation route against one server for a bounded time, on loopback.

    python scripts/soak.py --config configs/demo.yaml --clients 8 --duration 600   # starts and stops the server
    python scripts/soak.py --url http://127.0.0.1:8080 --pid 1234 --duration 60    # a server already running

Clients draw their next request (seeded) from /generate, /generate_stream (some hang up after a few tokens),
/v1/completions (plain and streamed) and /v1/chat/completions when the model has a chat template. The report gives
requests sent and answered, errors by type, p50/p99 latency per interval, and the server's RSS after warm-up and at
the end. It exits 1 when a target is missed: every request answered, no 5xx or other error, RSS growth below
--max-rss-growth, nothing left in flight afterwards (and, with --config, a clean exit 0 on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from local_server import LocalServer, check_loopback

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me about the sea.", "Where is the treasure buried?", "Once upon a time", "def fibonacci(n):",
           "The capital of France is", "Write a short poem about ships and storms and gulls."]  # fmt: skip
KINDS = {"generate": 3, "stream": 2, "stream_hangup": 1, "completion": 2, "completion_stream": 1, "chat": 2}


@dataclass
class Outcome:
    kind: str
    started: float
    seconds: float
    result: str  # "ok", "hangup" (meant), "http_<status>", or the exception's name (unanswered)


@dataclass
class Soak:
    url: str
    model: str
    max_new_tokens: int
    kinds: dict[str, int]
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0

    def body(self, kind: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
        prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 2)))
        n = rng.randint(max(1, self.max_new_tokens // 4), self.max_new_tokens)
        sample = rng.random() < 0.5
        if kind.startswith("completion"):
            stream, temperature = kind.endswith("stream"), 0.8 if sample else 0
            body = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": n,
                "temperature": temperature,
                "stream": stream,
            }
            return "/v1/completions", body
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            return "/v1/chat/completions", {"model": self.model, "messages": messages, "max_tokens": n}
        params = {"max_new_tokens": n, "do_sample": sample, "details": True} | (
            {"seed": rng.randint(0, 9)} if sample else {}
        )
        return ("/generate" if kind == "generate" else "/generate_stream"), {"inputs": prompt, "parameters": params}

    async def one(self, client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
        path, body = self.body(kind, rng)
        started = time.monotonic()
        self.sent += 1
        try:
            async with client.stream("POST", path, json=body) as r:
                if kind == "stream_hangup" and r.status_code == 200:
                    events = 0
                    async for line in r.aiter_lines():
                        events += line.startswith("data:")
                        if events >= rng.randint(1, 3):
                            break  # leaving the block closes the connection mid-stream
                    result = "hangup"
                else:
                    await r.aread()
                    result = "ok" if r.status_code == 200 and b'"error"' not in r.content else f"http_{r.status_code}"
                    if r.status_code == 200 and result != "ok":
                        result = "stream_error"
        except httpx.HTTPError as exc:
            result = type(exc).__name__
        return Outcome(kind, started, time.monotonic() - started, result)

    async def client(self, index: int, until: float, budget: list[int]) -> None:
        rng = random.Random(index)
        kinds, weights = list(self.kinds), list(self.kinds.values())
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as client:
            while time.monotonic() < until and budget[0] > 0:
                budget[0] -= 1
                self.outcomes.append(await self.one(client, rng.choices(kinds, weights)[0], rng))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (fields 14 and 15 of its stat line)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mergeserve_requests_in_flight{"))  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def chat_served(url: str, model: str) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code == 200


def report(
    soak: Soak, args: argparse.Namespace, start: float, rss: dict[str, float], samples: list[dict[str, float]]
) -> dict[str, Any]:
    results = Counter(o.result for o in soak.outcomes)
    intervals = []
    for i in range(int(args.duration // args.interval) + 1):
        lo, hi = start + i * args.interval, start + (i + 1) * args.interval
        done = [o.seconds for o in soak.outcomes if lo <= o.started + o.seconds < hi and o.result == "ok"]
        if not done:
            continue
        p50, p99 = round(percentile(done, 50), 3), round(percentile(done, 99), 3)
        row: dict[str, Any] = {"from_s": round(i * args.interval), "answered": len(done), "p50_s": p50, "p99_s": p99}
        if i + 1 < len(samples):
            a, b = samples[i], samples[i + 1]
            row["load_avg"] = round(b["load"], 2)
            if "cpu_s" in a:  # cores the server used over the interval (2.0 = both cores of this machine)
                row["server_cores"] = round((b["cpu_s"] - a["cpu_s"]) / (b["t"] - a["t"]), 2)
                row["rss_mb"] = round(b["rss_mb"], 1)
        intervals.append(row)
    answered = sum(
        n for r, n in results.items() if r in ("ok", "hangup") or r.startswith("http_") or r == "stream_error"
    )
    return {
        "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "sent": soak.sent,
        "answered": answered, "by_result": dict(results), "by_kind": dict(Counter(o.kind for o in soak.outcomes)),
        "intervals": intervals, "rss_mb": rss,
        "rss_growth": round(rss["end"] / rss["start"] - 1, 4) if rss.get("start") else None,
    }  # fmt: skip


def missed_targets(summary: dict[str, Any], max_growth: float) -> list[str]:
    missed = []
    if summary["answered"] != summary["sent"]:
        missed.append(f"{summary['sent'] - summary['answered']} request(s) unanswered")
    errors = {r: n for r, n in summary["by_result"].items() if r not in ("ok", "hangup")}
    if errors:
        missed.append(f"errors: {errors}")
    if summary["rss_growth"] is not None and summary["rss_growth"] >= max_growth:
        missed.append(f"RSS grew {summary['rss_growth']:.1%} after warm-up (target < {max_growth:.0%})")
    if summary.get("in_flight_after", 0):
        missed.append(f"{summary['in_flight_after']} request(s) still in flight after the run")
    if summary.get("exit_code", 0) != 0:
        missed.append(f"server exited with {summary['exit_code']} on SIGTERM")
    return missed


async def sample(pid: int | None, start: float, interval: float, until: float, out: list[dict[str, float]]) -> None:
    """At every interval boundary: the server's CPU seconds and RSS, and the machine's load average, so a slow
    interval can be told apart from a busy machine (on a shared CPU, the server's share of it moves)."""
    while True:
        out.append(
            {"t": time.monotonic() - start, "load": os.getloadavg()[0]}
            | ({"cpu_s": cpu_seconds(pid), "rss_mb": rss_mb(pid)} if pid is not None else {})
        )
        if time.monotonic() >= until:
            return
        await asyncio.sleep(interval - (time.monotonic() - start) % interval)


async def run(soak: Soak, args: argparse.Namespace, pid: int | None) -> dict[str, Any]:
    start = time.monotonic()
    until, budget = start + args.duration, [args.max_requests]
    clients = [asyncio.create_task(soak.client(i, until, budget)) for i in range(args.clients)]
    samples: list[dict[str, float]] = []
    sampler = asyncio.create_task(sample(pid, start, args.interval, until, samples))
    rss: dict[str, float] = {}
    if pid is not None:
        await asyncio.sleep(min(args.warmup, args.duration))
        rss["start"] = rss_mb(pid)
        print(f"soak: warm-up over, server RSS {rss['start']:.1f} MB", flush=True)
    await asyncio.gather(*clients)
    sampler.cancel()
    if pid is not None:
        rss["end"] = rss_mb(pid)
    return report(soak, args, start, rss, samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", help="start `python -m server serve --config FILE` on a free loopback port")
    target.add_argument("--url", help="a server already running on loopback (give --pid to measure its RSS)")
    parser.add_argument("--pid", type=int, help="the --url server's process id, for RSS")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (a hard bound)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="a bound on requests sent")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the RSS baseline")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per latency row")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--boot-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    server = None
    if args.config:
        server = LocalServer(args.config, prefix="soak")
        try:
            server.wait_healthy(args.boot_timeout)
        except (RuntimeError, TimeoutError) as exc:
            server.stop()
            raise SystemExit(f"soak: {exc}") from None
        print(f"soak: server pid {server.proc.pid} ready on {server.url} (log: {server.log})", flush=True)
        url, pid = server.url, server.proc.pid
    else:
        url, pid = check_loopback(args.url, "soak"), args.pid
    try:
        model = httpx.get(f"{url}/info", timeout=30).json()["model_id"]
        kinds = dict(KINDS)
        if not chat_served(url, model):
            print("soak: the model has no chat template; /v1/chat/completions left out", flush=True)
            del kinds["chat"]
        summary = asyncio.run(run(Soak(url, model, args.max_new_tokens, kinds), args, pid))
        time.sleep(1.0)  # hung-up streams are noticed within a decode step
        summary["in_flight_after"] = in_flight(url)
    finally:
        code = server.stop(grace=120) if server is not None else None
    if code is not None:
        summary["exit_code"] = code
    missed = missed_targets(summary, args.max_rss_growth)
    summary["targets_missed"] = missed
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print("soak: " + ("all targets met" if not missed else "MISSED: " + "; ".join(missed)), flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
