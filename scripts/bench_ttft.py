"""TTFT of a short prompt on an idle server vs while a long prompt is being admitted (chunked prefill's purpose).

Method: one server (`--config`, started here on a free loopback port, or `--url`). Prompts are cut to exact token
counts with TGI's `truncate` (the server keeps the last N tokens), so the lengths do not depend on how a text
tokenizes: short = 20 tokens, long = 1000. Every prompt is its own shuffle of common words, so no two share a prefix
and the server's prompt-prefix reuse (engine.prefix_cache_tokens) has nothing to reuse: this times the scheduler's
chunked prefill, not a cache hit. Each round (after --warmup rounds, not counted):
  * idle: the short prompt alone, streamed; TTFT = send to first `data:` event (client clock);
  * busy: the long prompt is sent (max_new_tokens 1), and --delay seconds later the short one; the short's TTFT is
    recorded, and whether its first token came before the long one's (it should: the long prompt is prefilled in
    chunks of limits.max_batch_prefill_tokens, and the short one waits for at most one chunk). The delay is drawn
    per round from the range --delay gives (default 0.1:0.6 s, seeded, all within the long prompt's prefill): how
    long the short one waits is the rest of the chunk in flight when it arrives, so one fixed delay times one point
    of the chunk and its "median" is that point's; random arrivals time the chunk's whole span, as clients do.
The two kinds alternate round by round, so drift hits both alike. Reported: medians and p90 of each, the ratio
busy/idle of the medians (target <= 2), and the long prompt's own TTFT (its whole prefill).

    python scripts/bench_ttft.py [--config configs/demo.yaml] [--rounds 10] [--delay 0.1:0.6 | 0.15] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator

import httpx
from local_server import running

WORDS = (
    "the",
    "old",
    "ship",
    "sailed",
    "on",
    "through",
    "grey",
    "morning",
    "and",
    "crew",
    "told",
    "stories",
    "of",
    "distant",
    "ports",
    "while",
    "gulls",
    "cried",
    "over",
    "harbour",
    "walls",
    "as",
    "rain",
    "fell",
    "softly",
    "upon",
    "wooden",
    "decks",
    "where",
    "sailors",
    "mended",
    "ropes",
    "sang",
    "songs",
    "dreamed",
    "home",
)
SHORT, LONG, TARGET = 20, 1000, 2.0


def filler(words: int, rng: random.Random) -> str:
    """`words` words drawn at random: two such texts part ways within a token or two, so share no prefix to reuse."""
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


async def first_token(
    client: httpx.AsyncClient, tokens: int, new_tokens: int, rng: random.Random
) -> tuple[float, float]:
    """(send time, TTFT) of a prompt cut to `tokens` tokens, streamed until its end."""
    body = {"inputs": filler(tokens + 50, rng),
            "parameters": {"max_new_tokens": new_tokens, "truncate": tokens, "do_sample": False}}  # fmt: skip
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", "/generate_stream", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:") and ttft is None:
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("stream ended without a data event")
    return start, ttft


async def busy_round(client: httpx.AsyncClient, delay: float, rng: random.Random) -> tuple[float, float, bool]:
    """(short TTFT, long TTFT, short answered first) with the long prompt sent `delay` s before the short."""
    long_task = asyncio.create_task(first_token(client, LONG, 1, rng))
    await asyncio.sleep(delay)
    short_start, short_ttft = await first_token(client, SHORT, 8, rng)
    long_start, long_ttft = await long_task
    return short_ttft, long_ttft, short_start + short_ttft < long_start + long_ttft


def delays(spec: str, count: int) -> list[float]:
    """`count` delays in seconds: "a:b" uniform in [a, b] (seeded), or one fixed number."""
    low, _, high = spec.partition(":")
    if not high:
        return [float(low)] * count
    rng = random.Random(1)
    return [rng.uniform(float(low), float(high)) for _ in range(count)]


async def measure(url: str, rounds: int, warmup: int, delay: str) -> dict[str, object]:
    idle: list[float] = []
    busy: list[float] = []
    longs: list[float] = []
    first = 0
    rng = random.Random(0)
    waits = delays(delay, warmup + rounds)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for r in range(warmup + rounds):
            _, t_idle = await first_token(client, SHORT, 8, rng)
            t_busy, t_long, short_first = await busy_round(client, waits[r], rng)
            if r >= warmup:
                idle.append(t_idle)
                busy.append(t_busy)
                longs.append(t_long)
                first += short_first
    med_idle, med_busy = statistics.median(idle), statistics.median(busy)
    return {
        "rounds": rounds, "delay_s": delay, "delays_s": [round(w, 3) for w in waits[warmup:]],
        "short_tokens": SHORT, "long_tokens": LONG, "busy_ttft_ms_each": [round(1000 * t, 1) for t in busy],
        "idle_ttft_ms": {"p50": 1000 * med_idle, "p90": 1000 * _p90(idle)},
        "busy_ttft_ms": {"p50": 1000 * med_busy, "p90": 1000 * _p90(busy)},
        "long_ttft_ms": {"p50": 1000 * statistics.median(longs)},
        "busy_over_idle": med_busy / med_idle, "target": TARGET, "short_answered_first": f"{first}/{rounds}",
    }  # fmt: skip


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]


@contextlib.contextmanager
def server_url(args: argparse.Namespace) -> Iterator[str]:
    if args.url:
        yield args.url
        return
    with running(args.config, boot_timeout=900, prefix="bench-ttft") as server:
        yield server.url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--delay", default="0.1:0.6", help="seconds from the long to the short request; a:b: random")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with server_url(args) as url:
        result = asyncio.run(measure(url, args.rounds, args.warmup, args.delay))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
