"""Profile the torch engine's decode step at batch 1 and 8: where a step's time goes, ours vs the model's.

Method: boot the config in this process (the merge cache makes that a load), then per batch size B send B greedy
requests of --new-tokens tokens at once (the 8 chat prompts of bench_serving.py), once as warm-up and once under
torch.profiler (CPU). The scheduler labels its phases with `record_function`: `decode.step` (a whole step),
`decode.forward` (the model forward over the KV slab), `row.sample`, `row.detokenize` (incremental detokenizing and
stop rules), `row.emit` (handing the token to its reader) and `decode.filter` (rows leaving). A prefill chunk that
shares a decode step's forward (server.engine.mixed) is inside that step's `decode.forward`; a prefill forward of its
own (`prefill.forward`, no row decoding yet) is outside every step. Per step:
forward, sampling, detokenizing, emit, and "bookkeeping" = step - the others (building the token batch, the loop).
Only steps at the full batch size count for B = 8 would need a steady batch; all steps are averaged here, and the
steps count is printed. The profiler adds a few microseconds per op, so the small phases read high, not low.
The top aten/oneDNN ops inside the forward are listed too (self CPU time).

    python scripts/profile_decode.py [--config configs/demo.yaml] [--dtype float32] [--batches 1,8]
        [--new-tokens 48] [--out docs/profile/run.md]
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_serving import chat_prompts
from torch.profiler import ProfilerActivity, profile

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest

PHASES = ("decode.forward", "row.sample", "row.detokenize", "row.emit", "decode.filter")


def run_batch(engine: Engine, prompts: list[str], batch: int, new_tokens: int) -> None:
    """`batch` greedy requests at once, each on its own thread, all joined."""
    requests = [
        PreparedRequest(engine.tokenize(prompts[i % len(prompts)]), SamplingParams(), new_tokens) for i in range(batch)
    ]
    threads = [threading.Thread(target=engine.generate, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def breakdown(prof: Any) -> tuple[dict[str, float], int, list[tuple[str, float]]]:
    """Per-step milliseconds of each phase, the step count, and the top aten ops (ms per step, self CPU)."""
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    for event in prof.events():
        if event.name == "decode.step":
            steps += 1
        if event.name in (*PHASES, "decode.step"):
            totals[event.name] += event.cpu_time_total / 1000  # us -> ms
    per_step = {name: totals[name] / max(steps, 1) for name in ("decode.step", *PHASES)}
    per_step["bookkeeping"] = per_step["decode.step"] - sum(per_step[p] for p in PHASES)
    aten = [a for a in prof.key_averages() if a.key.startswith(("aten::", "mkldnn::", "mkl::"))]
    ops = sorted(((a.key, a.self_cpu_time_total / 1000 / max(steps, 1)) for a in aten), key=lambda kv: -kv[1])
    return per_step, steps, ops[:8]


def markdown(results: dict[int, tuple[dict[str, float], int, list[tuple[str, float]]]], title: str) -> str:
    batches = sorted(results)
    lines = [f"### {title}", "", "| per decode step (ms) | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]  # fmt: skip
    labels = {"decode.step": "whole step", "decode.forward": "model forward", "row.sample": "sampling (all rows)",
              "row.detokenize": "detokenize + stop rules", "row.emit": "emit to readers",
              "decode.filter": "rows leaving (slab moves)", "bookkeeping": "our bookkeeping (the rest)"}  # fmt: skip
    for key, label in labels.items():
        cells = []
        for b in batches:
            value, whole = results[b][0][key], results[b][0]["decode.step"]
            cells.append(f"{value:.2f} ({100 * value / whole:.1f} %)" if key != "decode.step" else f"{value:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| steps profiled | " + " | ".join(str(results[b][1]) for b in batches) + " |")
    for b in batches:
        lines += ["", f"Top aten ops at batch {b} (self CPU ms per step): "
                  + ", ".join(f"`{k}` {v:.2f}" for k, v in results[b][2])]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--dtype", default=None, help="override model.dtype (float32, bfloat16, float16)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = load_config(args.config)
    if args.dtype:
        config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": args.dtype})})
    engine = boot(config)
    prompts = chat_prompts(engine.tokenizer)
    results = {}
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            run_batch(engine, prompts, batch, args.new_tokens)  # warm-up, not profiled
            # The scheduler runs on its own thread: without profile_all_threads only this thread's ops are seen.
            every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
            with profile(activities=[ProfilerActivity.CPU], experimental_config=every_thread) as prof:
                run_batch(engine, prompts, batch, args.new_tokens)
            results[batch] = breakdown(prof)
    finally:
        engine.close()
    title = f"{args.config}, {engine.info.dtype}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens"
    text = markdown(results, title)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
