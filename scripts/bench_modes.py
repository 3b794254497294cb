"""Benchmark base vs unmerged vs merged decoding of the demo, in one process, as ratios.

All three arms run the same greedy loop the server uses (server.engine.batch's `Batch`: slab KV cache,
prefill, decode steps)
for a fixed number of new tokens, interleaved round by round so drift in machine speed hits every arm alike. Warm-up
rounds are excluded; the figures are medians over the timed rounds.

    python scripts/bench_modes.py [--config configs/demo.yaml] [--rounds 7] [--warmup 2] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from server.config.load import load_config
from server.engine.batch import Batch
from server.load.adapters import load_adapters, load_base
from server.merge.apply import merge_and_unload

PROMPT = "What is the capital of Germany? Answer in one sentence, then explain why it became the capital."


def greedy_seconds(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of prefill + (new_tokens - 1) decode steps; input_ids: (1, T)."""
    start = time.perf_counter()
    batch: Batch[str] = Batch(slots=1, budget=input_ids.shape[1])
    batch.add("row", input_ids[0].tolist())
    [(row, logits)] = batch.prefill(model, batch.next_chunks())
    batch.join(row)
    for _ in range(new_tokens - 1):
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        logits = batch.step(model, token)
    return time.perf_counter() - start


def build_arms(config_path: str) -> tuple[dict[str, nn.Module], torch.Tensor]:
    config = load_config(config_path)
    tokenizer, base = load_base(config.model)
    names = [a.name for a in config.adapters]
    unmerged, _ = load_adapters(copy.deepcopy(base), config.adapters)
    to_merge, _ = load_adapters(copy.deepcopy(base), config.adapters)
    merged = merge_and_unload(to_merge, names)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text).input_ids])
    return {"base": base, "unmerged": unmerged, "merged": merged}, ids


def run(
    arms: dict[str, nn.Module], ids: torch.Tensor, rounds: int, warmup: int, new_tokens: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in arms}
    order = list(arms)
    for r in range(warmup + rounds):
        # Rotate the order each round so no arm always runs first (cache-warm) or last.
        for name in order[r % len(order) :] + order[: r % len(order)]:
            seconds = greedy_seconds(arms[name], ids, new_tokens)
            if r >= warmup:
                times[name].append(seconds)
    return times


def report(times: dict[str, list[float]], new_tokens: int, prompt_tokens: int) -> dict[str, object]:
    med = {name: statistics.median(t) for name, t in times.items()}
    tps = {name: new_tokens / s for name, s in med.items()}
    return {
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "rounds": len(next(iter(times.values()))),
        "threads": torch.get_num_threads(),
        "median_seconds": med,
        "tokens_per_second": tps,
        "merged_over_base_speed": tps["merged"] / tps["base"],
        "merged_over_unmerged_speed": tps["merged"] / tps["unmerged"],
    }


def markdown(result: dict[str, object]) -> str:
    tps = result["tokens_per_second"]
    med = result["median_seconds"]
    assert isinstance(tps, dict) and isinstance(med, dict)
    lines = ["| arm | median s / request | tokens/s | speed vs merged |", "|---|---:|---:|---:|"]
    for name in ("base", "unmerged", "merged"):
        lines.append(f"| {name} | {med[name]:.3f} | {tps[name]:.1f} | {tps[name] / tps['merged']:.3f} |")
    lines.append("")
    lines.append(
        f"merged/base speed = {result['merged_over_base_speed']:.3f}, "
        f"merged/unmerged speed = {result['merged_over_unmerged_speed']:.3f} "
        f"({result['new_tokens']} new tokens, {result['prompt_tokens']}-token prompt, median of {result['rounds']} "
        f"interleaved rounds, {result['threads']} threads)"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5 for a meaningful median")
    arms, ids = build_arms(args.config)
    times = run(arms, ids, args.rounds, args.warmup, args.new_tokens)
    result = report(times, args.new_tokens, ids.shape[1])
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
