"""Benchmark the serving engine: a live server under 1..8 concurrent streaming clients vs raw `model.generate`.

Method:
- Raw baseline, in this process and before the server starts (so the two never share the CPU): the merged model is
  built with the project's own loaders (load_base -> load_adapters -> merge_and_unload, the config's dtype), then
  `model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)` runs (a) one prompt at a time over the 8
  prompts and (b) the 8 prompts as one static left-padded batch. One warm-up pass, then the median of --reps passes.
- Server: `python -m server serve` on a free loopback port (log in a temp file), polled until /health is 200. At each
  concurrency level C, the C clients first send one request each (warm-up, excluded); then the level sends
  rounds x 8 requests (every prompt `rounds` times, so every level sees the same prompt mix), split evenly over the
  C clients, each client one request after another, all over POST /generate_stream. Per request: latency (send to
  last event), TTFT (send to first `data:` event), TPOT ((latency - TTFT) / (tokens - 1)) and the generated token
  count from the last event's details. Throughput = all generated tokens of the level / wall time of the level.
  The server has no ignore_eos, so a request may stop at EOS before N tokens: tokens are counted, never assumed
  (the prompts ask for long answers to make that rare).
- During the largest level a side task GETs /health every 0.2 s and records its latency (client-side).
- Checks: tokens/s at 8 clients >= 3x at 1 client and >= 0.9x the raw static batch; 1-client latency <= 1.10x the raw
  sequential per-prompt time (per generated token, which is the plain ratio when every request makes N tokens, and
  never favours the server when it stops early); /health under load < 100 ms (max of all polls).

    python scripts/bench_serving.py [--config configs/demo.yaml] [--mode merged] [--new-tokens 64] [--rounds 3]
        [--reps 3] [--levels 1,2,4,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from local_server import LocalServer
from transformers.utils import logging as hf_logging

from server.config.load import load_config
from server.load.adapters import load_adapters, load_base
from server.merge.apply import merge_and_unload

QUESTIONS = [
    "Tell me a long story about a ship lost at sea.",
    "Describe, step by step, how to bake a loaf of bread.",
    "Explain in detail how the tides work.",
    "Write a long letter to a friend about your voyage across the ocean.",
    "Describe everything you would pack for a month-long sea voyage, and why.",
    "Explain in detail how a compass works and how sailors used it.",
    "Tell me the history of the city of London in several paragraphs.",
    "Describe a day in the life of a sailor on an old wooden ship, from dawn to night.",
]
HEALTH_PERIOD_S, MAX_HEALTH_POLLS = 0.2, 20_000
BOOT_TIMEOUT_S, REQUEST_TIMEOUT_S = 900.0, 600.0
TARGET_SCALE, TARGET_VS_BATCH, TARGET_LATENCY, TARGET_HEALTH_MS = 3.0, 0.9, 1.10, 100.0


def chat_prompts(tokenizer: Any) -> list[str]:
    return [
        str(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True))
        for q in QUESTIONS
    ]


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def build_merged(config_path: str) -> tuple[Any, torch.nn.Module, str]:
    config = load_config(config_path)
    tokenizer, base = load_base(config.model)
    peft_model, _ = load_adapters(base, config.adapters)
    model = merge_and_unload(peft_model, [a.name for a in config.adapters])
    return tokenizer, model, str(next(model.parameters()).dtype).removeprefix("torch.")


@torch.inference_mode()
def timed_generate(model: Any, tokenizer: Any, texts: list[str], new_tokens: int) -> tuple[float, int]:
    """Wall seconds and generated tokens of one greedy `generate` call over `texts` (one left-padded batch)."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    greedy = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    out = model.generate(**batch, **greedy, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    return seconds, (out.shape[1] - batch["input_ids"].shape[1]) * len(texts)


def raw_baseline(config_path: str, new_tokens: int, reps: int) -> dict[str, Any]:
    tokenizer, model, dtype = build_merged(config_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = chat_prompts(tokenizer)
    seq_s, batch_s, tokens = [], [], 0
    for rep in range(reps + 1):  # rep 0 is the warm-up
        runs = [timed_generate(model, tokenizer, [p], new_tokens) for p in prompts]
        batch = timed_generate(model, tokenizer, prompts, new_tokens)
        tokens = sum(n for _, n in runs)
        if batch[1] != tokens or tokens != new_tokens * len(prompts):
            raise RuntimeError(f"raw generate made {tokens}/{batch[1]} tokens, expected {new_tokens * len(prompts)}")
        if rep > 0:
            seq_s.append(sum(s for s, _ in runs))
            batch_s.append(batch[0])
    del model
    gc.collect()
    seq, bat = statistics.median(seq_s), statistics.median(batch_s)
    return {"dtype": dtype, "prompts": prompts, "reps": reps, "tokens_per_pass": tokens, "sequential_s": seq_s,
            "batch_s": batch_s, "sequential_tokens_per_s": tokens / seq, "batch_tokens_per_s": tokens / bat,
            "per_prompt_s": seq / len(prompts), "per_prompt_ms_per_token": 1000 * seq / tokens,
            "batch_ms_per_step": 1000 * bat / new_tokens}  # fmt: skip


@dataclass
class Sample:
    latency: float
    ttft: float
    tokens: int

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(self.tokens - 1, 1)


async def stream_one(client: httpx.AsyncClient, prompt: str, new_tokens: int) -> Sample:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "do_sample": False, "details": True}}
    start = time.perf_counter()
    ttft: float | None = None
    events = tokens = 0
    async with client.stream("POST", "/generate_stream", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"server error in stream: {event['error']}")
            events += 1
            if event.get("details"):
                tokens = int(event["details"]["generated_tokens"])
    if ttft is None:
        raise RuntimeError("stream ended without a data event")
    return Sample(time.perf_counter() - start, ttft, tokens or events)


async def client_loop(client: httpx.AsyncClient, prompts: list[str], new_tokens: int) -> list[Sample]:
    return [await stream_one(client, p, new_tokens) for p in prompts]


async def poll_health(url: str, stop: asyncio.Event) -> tuple[list[float], int]:
    """Latencies of GET /health every HEALTH_PERIOD_S until `stop`, and how many answers were not 200."""
    latencies, bad = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(MAX_HEALTH_POLLS):
            if stop.is_set():
                break
            start = time.perf_counter()
            bad += (await client.get("/health")).status_code != 200
            latencies.append(time.perf_counter() - start)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEALTH_PERIOD_S)
    return latencies, bad


def assignments(n_prompts: int, clients: int, rounds: int) -> list[list[int]]:
    """Prompt indices per client: rounds x n_prompts requests in all, each prompt equally often, split evenly."""
    per_client = math.ceil(rounds * n_prompts / clients)
    return [[(c * per_client + j) % n_prompts for j in range(per_client)] for c in range(clients)]


async def run_level(url: str, prompts: list[str], clients: int, rounds: int, new_tokens: int, watch: bool) -> dict:
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        await asyncio.gather(*(stream_one(client, prompts[c % len(prompts)], new_tokens) for c in range(clients)))
        stop = asyncio.Event()
        health = asyncio.create_task(poll_health(url, stop)) if watch else None
        start = time.perf_counter()
        per_client = [[prompts[i] for i in idx] for idx in assignments(len(prompts), clients, rounds)]
        results = await asyncio.gather(*(client_loop(client, ps, new_tokens) for ps in per_client))
        wall = time.perf_counter() - start
        stop.set()
        health_latencies, health_bad = await health if health else ([], 0)
    out = summarize(clients, [s for r in results for s in r], wall)
    if watch:
        hl = health_latencies
        out["health"] = {"polls": len(hl), "non_200": health_bad, "p50_ms": median_ms(hl), "max_ms": 1000 * max(hl)}
    return out


def summarize(clients: int, samples: list[Sample], wall: float) -> dict[str, Any]:
    lat, tokens = [s.latency for s in samples], sum(s.tokens for s in samples)
    return {"clients": clients, "requests": len(samples), "tokens": tokens,
            "min_tokens": min(s.tokens for s in samples), "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": statistics.median(lat), "latency_p95_s": nearest_rank(lat, 0.95),
            "ttft_p50_ms": median_ms([s.ttft for s in samples]), "tpot_p50_ms": median_ms([s.tpot for s in samples]),
            "latency_per_token_p50_ms": median_ms([s.latency / s.tokens for s in samples])}  # fmt: skip


async def run_levels(url: str, prompts: list[str], levels: list[int], rounds: int, new_tokens: int) -> list[dict]:
    results = []
    for clients in levels:
        print(f"level {clients} client(s)...", file=sys.stderr, flush=True)
        results.append(await run_level(url, prompts, clients, rounds, new_tokens, clients == max(levels)))
    return results


def checks(raw: dict[str, Any], levels: list[dict]) -> list[dict[str, Any]]:
    by = {lv["clients"]: lv for lv in levels}
    out = []

    def add(name: str, value: float, op: str, target: float) -> None:
        passed = value >= target if op == ">=" else value <= target if op == "<=" else value < target
        out.append({"check": name, "value": value, "op": op, "target": target, "pass": passed})

    if 1 in by and 8 in by:
        add("tokens/s 8 clients / 1 client", by[8]["tokens_per_s"] / by[1]["tokens_per_s"], ">=", TARGET_SCALE)
    if 8 in by:
        add("tokens/s 8 clients / raw static batch 8", by[8]["tokens_per_s"] / raw["batch_tokens_per_s"], ">=",
            TARGET_VS_BATCH)  # fmt: skip
    if 1 in by:
        ratio = by[1]["latency_per_token_p50_ms"] / raw["per_prompt_ms_per_token"]
        add("latency 1 client / raw sequential (per generated token)", ratio, "<=", TARGET_LATENCY)
    watched = next((lv for lv in levels if "health" in lv), None)
    if watched:
        add(f"/health max ms under {watched['clients']}-client load", watched["health"]["max_ms"], "<",
            TARGET_HEALTH_MS)  # fmt: skip
    return out


def markdown(raw: dict[str, Any], levels: list[dict], mode: str, new_tokens: int) -> str:
    lines = [
        "| arm | clients | requests | tokens | tokens/s | p50 latency s | p95 latency s | TTFT p50 ms | TPOT p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| raw generate, one at a time | 1 | 8 | {raw['tokens_per_pass']} | {raw['sequential_tokens_per_s']:.1f}"
        f" | {raw['per_prompt_s']:.3f} | - | - | {raw['per_prompt_ms_per_token']:.1f} |",
        f"| raw generate, static batch of 8 | 8 | 8 | {raw['tokens_per_pass']} | {raw['batch_tokens_per_s']:.1f}"
        f" | {raw['batch_ms_per_step'] * new_tokens / 1000:.3f} | - | - | {raw['batch_ms_per_step']:.1f} |",
    ]
    for lv in levels:
        lines.append(
            f"| server ({mode}) | {lv['clients']} | {lv['requests']} | {lv['tokens']} | {lv['tokens_per_s']:.1f}"
            f" | {lv['latency_p50_s']:.3f} | {lv['latency_p95_s']:.3f} | {lv['ttft_p50_ms']:.1f}"
            f" | {lv['tpot_p50_ms']:.1f} |"
        )
    return "\n".join(lines)


def print_report(result: dict[str, Any]) -> None:
    raw, levels = result["raw"], result["levels"]
    print(markdown(raw, levels, result["mode"], result["new_tokens"]))
    print(
        f"\n{result['new_tokens']} new tokens/request (greedy), {raw['dtype']}, {result['threads']} torch threads, "
        f"raw: median of {raw['reps']} passes after 1 warm-up; server: {result['rounds']} x 8 requests per level "
        f"after 1 warm-up request per client; server max_batch_size {result['server_info']['max_batch_size']}; "
        f"1-min load average {result['loadavg_start']:.2f} at start, {result['loadavg_end']:.2f} at end.\n"
        "raw rows: latency = one prompt's (sequential) or the whole batch call's time; TPOT column = wall time per "
        "token (sequential) or per decode step, prefill included (batch)."
    )
    for lv in levels:
        if lv["min_tokens"] < result["new_tokens"]:
            print(f"note: at {lv['clients']} client(s) requests stopped at EOS (fewest tokens: {lv['min_tokens']})")
        if "health" in lv:
            h = lv["health"]
            print(f"/health under {lv['clients']}-client load: {h['polls']} polls, p50 {h['p50_ms']:.1f} ms, "
                  f"max {h['max_ms']:.1f} ms, non-200: {h['non_200']}")  # fmt: skip
    one = next((lv for lv in levels if lv["clients"] == 1), None)
    if one:
        print(f"plain latency ratio 1 client p50 / raw per-prompt: {one['latency_p50_s'] / raw['per_prompt_s']:.3f}")
    print("\nTargets:")
    for c in result["checks"]:
        print(f"- {c['check']}: {c['value']:.3f} (target {c['op']} {c['target']}) {'PASS' if c['pass'] else 'MISS'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--mode", choices=["merged", "unmerged"], default="merged")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="each prompt is sent this many times per level")
    parser.add_argument("--reps", type=int, default=3, help="timed passes of the raw baseline (after 1 warm-up)")
    parser.add_argument("--levels", default="1,2,4,8", help="comma-separated client counts")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--prefix-cache-tokens", type=int, default=None,
                        help="the server's engine.prefix_cache_tokens (0: off; the prompts repeat, so on, every "
                        "repeat prefills one token, which the raw baseline does not get)")  # fmt: skip
    args = parser.parse_args()
    levels = sorted({int(x) for x in args.levels.split(",")})
    if args.reps < 3 or args.rounds < 1 or args.new_tokens < 2 or min(levels) < 1:
        parser.error("need --reps >= 3, --rounds >= 1, --new-tokens >= 2 and levels >= 1")
    hf_logging.set_verbosity_error()
    loadavg = os.getloadavg()[0]
    print("raw baseline...", file=sys.stderr, flush=True)
    raw = raw_baseline(args.config, args.new_tokens, args.reps)
    cache = [] if args.prefix_cache_tokens is None else ["--prefix-cache-tokens", str(args.prefix_cache_tokens)]
    server = LocalServer(args.config, "--mode", args.mode, "--log-level", "warning", *cache, prefix="bench-serving")
    url, log_path = server.url, server.log
    try:
        boot_s = server.wait_healthy(BOOT_TIMEOUT_S)
        info = httpx.get(f"{url}/info", timeout=10).json()
        print(f"server healthy after {boot_s:.1f} s: {info['mode']}, {info['dtype']}, max_batch_size "
              f"{info['max_batch_size']}", file=sys.stderr, flush=True)  # fmt: skip
        results = asyncio.run(run_levels(url, raw["prompts"], levels, args.rounds, args.new_tokens))
    finally:
        server.stop()
    result = {"config": args.config, "mode": args.mode, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "loadavg_start": loadavg, "loadavg_end": os.getloadavg()[0],
              "boot_s": boot_s, "server_info": info, "server_log": str(log_path),
              "raw": raw, "levels": results}  # fmt: skip
    result["checks"] = checks(raw, results)
    print_report(result)
    print(f"server log: {log_path}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
