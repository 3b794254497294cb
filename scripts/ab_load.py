"""Driving A/B load against mergeserve: start an `ab` server, stream the fixed prompts to each arm, note the machine.

Shared by scripts/ab_report.py (concurrency levels, one report) and scripts/ab_sweep.py (one level per adapter rank
and count); the method is in ab_report's docstring. Kept apart from both so neither imports the other's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from ab_stats import ARMS, Sample
from local_server import REPO, LocalServer

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
# How the arms share the server (--arms), as the report's page and console state it.
ARM_MODES = {
    "isolated": "one arm in flight at a time: blocks of c requests of one arm, each block waited out before the "
    "next, the arms' blocks interleaved (pair i = the same prompt in two adjacent blocks, the arm that goes first "
    "swapping from one pair of blocks to the next), so each arm's figures are that arm's own speed at concurrency c",
    "mixed": "c workers each send a pair's two requests back to back, odd workers starting on unmerged, so at c >= 2 "
    "both arms are in flight together, as in a 50/50 deployment: each arm's figures include the other arm's load "
    "(at c = 1 one request is in flight at a time, as in isolated)",
}
LEGACY_PHASE = {"aligned": "isolated", "staggered": "mixed"}  # --phase, the option's name before --arms
HEAVY = ("bench_serving", "train_demo_adapter", "pytest", "bench_modes", "bench_memory", "server serve", "pip install")


class BootFailed(RuntimeError):
    """The server exited while booting: its exit code and last log line (for a refusal, its one-line reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"exit {code}: {reason}")
        self.code = code


@contextlib.contextmanager
def managed_server(config: Path, boot_timeout: float) -> Iterator[tuple[str, Path]]:
    """Start an `ab` server here on a free loopback port; yield (url, log); stop it. BootFailed if it exits first."""
    server = LocalServer(config, "--mode", "ab", prefix="ab_report")
    try:
        print(f"ab_report: booting {config} on {server.url} (log {server.log})", file=sys.stderr)
        try:
            server.wait_healthy(boot_timeout)
        except RuntimeError:
            if server.proc.poll() is None:
                raise
            lines = [line for line in server.read_log().splitlines() if line.strip()]
            raise BootFailed(server.proc.returncode, lines[-1] if lines else "no output") from None
        yield server.url, server.log
    finally:
        print(f"ab_report: server stopped, exit code {server.stop()}", file=sys.stderr)


def server_info(urls: dict[str, str]) -> dict[str, Any]:
    with httpx.Client(trust_env=False, timeout=10) as client:
        return {arm: client.get(f"{url}/info").json() for arm, url in urls.items()}


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
            if (queued := r.headers.get("x-queue-time")) is not None:
                sample.queue = float(queued) / 1000
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


@dataclass
class Progress:
    """One stderr line per finished request: the level and arm the run is on, and an ETA from its pace so far
    (requests of a level take about equally long, so the mean so far is a fair guess for the rest)."""

    total: int
    label: str = "ab_report"
    done: int = 0
    start: float = field(default_factory=time.perf_counter)

    def step(self, sample: Sample) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"{self.label}: level {sample.level}, {sample.arm} arm: {self.done}/{self.total} requests, "
              f"{elapsed / 60:.1f} min elapsed, ETA ~{eta / 60:.1f} min", file=sys.stderr)  # fmt: skip


def plan(level: int, pairs: int) -> list[list[tuple[int, str]]]:
    """Mixed arms, per worker, its (pair, arm) requests: pair p goes to worker p % c, which sends its merged and
    unmerged request back to back; odd workers start on unmerged, so at c >= 2 both arms are in flight together."""
    workers: list[list[tuple[int, str]]] = [[] for _ in range(level)]
    for p in range(pairs):
        w = p % level
        workers[w].extend((p, arm) for arm in (ARMS if w % 2 == 0 else ARMS[::-1]))
    return workers


def isolated_blocks(level: int, pairs: int) -> list[tuple[str, list[int]]]:
    """Isolated arms: (arm, pairs) blocks, each sent at once and waited out before the next, so one arm is in flight
    at a time. Pairs k*c .. k*c+c-1 go to both arms in two adjacent blocks; the arm that goes first swaps with k
    (merged, unmerged, unmerged, merged, ...), so a steady drift in machine speed favours neither arm."""
    blocks: list[tuple[str, list[int]]] = []
    for k, first in enumerate(range(0, pairs, level)):
        chunk = list(range(first, min(first + level, pairs)))
        blocks += [(arm, chunk) for arm in (ARMS if k % 2 == 0 else ARMS[::-1])]
    return blocks


async def run_level(
    urls: dict[str, str], level: int, args: argparse.Namespace, progress: Progress | None = None
) -> list[Sample]:
    pairs = args.requests + args.warmup
    samples = {(p, arm): Sample(level, arm, p, (p - args.warmup) % len(PROMPTS), p < args.warmup)
               for p in range(pairs) for arm in ARMS}  # fmt: skip
    limits = httpx.Limits(max_connections=2 * level + 2)
    async with httpx.AsyncClient(trust_env=False, timeout=args.request_timeout, limits=limits) as client:

        async def one(key: tuple[int, str]) -> None:
            await send(client, urls[key[1]], samples[key], args.max_new_tokens)
            if progress is not None:
                progress.step(samples[key])

        async def worker(jobs: list[tuple[int, str]]) -> None:
            for key in jobs:
                await one(key)

        t0 = time.perf_counter()
        if args.arms == "isolated":
            for arm, chunk in isolated_blocks(level, pairs):
                await asyncio.gather(*(one((p, arm)) for p in chunk))
        else:
            await asyncio.gather(*(worker(jobs) for jobs in plan(level, pairs)))
    for s in samples.values():
        s.start, s.end = s.start - t0, s.end - t0
    return list(samples.values())


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
