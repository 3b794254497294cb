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

Then, without the profiler (which inflates every small op), per B: a decode forward over the KV slab as the engine
runs it (B rows, 64 cached tokens each, 20 steps; the fused kernels of server.engine.fused_decode where they load),
the same through the eager direct decoder stack of server.engine.decoder, through transformers' forward, and the same
linear layers alone (each called once on B random rows, in the served
kernels), interleaved, median of 9 repetitions after one warm-up. Served minus linears is what everything else in the
forward costs: norms, rotary, attention, the slab writes, elementwise ops and Python, i.e. what fusing the non-linear
part of a layer could save at most.

    python scripts/profile_decode.py [--config configs/demo.yaml] [--dtype float32] [--batches 1,8]
        [--new-tokens 48] [--out docs/profile/run.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_serving import chat_prompts
from torch.profiler import ProfilerActivity, profile

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.batch import decode_rows
from server.engine.decoder import direct_stack
from server.engine.engine import Engine
from server.engine.fused_decode import fusable
from server.engine.kernels import small_rows_scope
from server.engine.kv_slab import KVSlab, forward
from server.engine.sampling import SamplingParams
from server.engine.slab_ops import load_slab_ops
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
    """Per-step milliseconds of each phase, the step count, and the top aten, oneDNN and fused-kernel ops (ms per
    step, self CPU)."""
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    for event in prof.events():
        if event.name == "decode.step":
            steps += 1
        if event.name in (*PHASES, "decode.step"):
            totals[event.name] += event.cpu_time_total / 1000  # us -> ms
    per_step = {name: totals[name] / max(steps, 1) for name in ("decode.step", *PHASES)}
    per_step["bookkeeping"] = per_step["decode.step"] - sum(per_step[p] for p in PHASES)
    aten = [a for a in prof.key_averages() if a.key.startswith(("aten::", "mkldnn::", "mkl::", "mergeserve::"))]
    ops = sorted(((a.key, a.self_cpu_time_total / 1000 / max(steps, 1)) for a in aten), key=lambda kv: -kv[1])
    return per_step, steps, ops[:8]


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules with `in_features` (a PEFT LoRA wrapper, not also its base layer): what a forward runs."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if hasattr(module, "in_features") and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def _decode_ms(model: torch.nn.Module, batch: int, steps: int, stack: Any | None, fused: Any | None = None) -> float:
    """ms per decode forward over a slab of `batch` rows with 64 cached tokens each (`stack`, `fused`: as
    batch.decode_rows)."""
    slab = KVSlab(batch)
    prompt = torch.randint(100, 1000, (batch, 64), generator=torch.Generator().manual_seed(batch))
    forward(model, slab, torch.arange(batch), prompt, [0] * batch, [63] * batch, stack)
    slab.lengths = [64] * batch
    tokens = prompt[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        logits = decode_rows(model, slab, tokens, stack, fused)
        slab.lengths = [n + 1 for n in slab.lengths]
        tokens = logits.argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / steps * 1000


@torch.inference_mode()
def floor(model: torch.nn.Module, batch: int, steps: int = 20, reps: int = 9) -> dict[str, float]:
    """Medians, unprofiled, interleaved per repetition (the first is warm-up), ms: the decode forward as served
    (fused kernels, else the direct stack where the model allows it), the eager direct stack, transformers' forward,
    and its linear layers alone; and the medians of the per-repetition ratios served / eager direct and direct /
    transformers."""
    layers = linear_layers(model)
    dtype = next(model.parameters()).dtype
    inputs = [torch.randn(batch, 1, layer.in_features, dtype=dtype) for layer in layers]  # type: ignore[arg-type]
    stack = direct_stack(model)
    ops = load_slab_ops("auto", next(model.parameters()).device) if stack is not None and fusable(stack) else None
    times: dict[str, list[float]] = {"served": [], "direct": [], "transformers": [], "linears": []}
    for rep in range(reps + 1):
        with small_rows_scope(model, batch):
            served = _decode_ms(model, batch, steps, stack, ops)
            direct, wrapped = _decode_ms(model, batch, steps, stack), _decode_ms(model, batch, steps, None)
            start = time.perf_counter()
            for _ in range(steps):
                for layer, x in zip(layers, inputs, strict=True):
                    layer(x)
            linears = (time.perf_counter() - start) / steps * 1000
        for name, value in (("served", served), ("direct", direct), ("transformers", wrapped), ("linears", linears)):
            times[name] += [value] if rep else []
    result = {name: statistics.median(values) for name, values in times.items()}
    fused = [a / b for a, b in zip(times["served"], times["direct"], strict=True)]
    direct_ratio = [a / b for a, b in zip(times["direct"], times["transformers"], strict=True)]
    how = "fused kernels" if ops is not None else "direct stack" if stack is not None else "transformers"
    return {**result, "fused_ratio": statistics.median(fused), "ratio": statistics.median(direct_ratio), "how": how}


def floor_markdown(floors: dict[int, dict[str, Any]]) -> str:
    batches = sorted(floors)
    head = "| unprofiled, 64 cached tokens (ms, median of 9) | " + " | ".join(f"batch {b}" for b in batches) + " |"
    lines = ["", head, "|---|" + "---:|" * len(batches)]
    rows = {
        f"decode forward as served ({floors[batches[0]]['how']})": "served",
        "the same through the eager direct stack": "direct",
        "as served / eager direct stack (median of ratios)": "fused_ratio",
        "the same through transformers' forward": "transformers",
        "eager direct stack / transformers (median of ratios)": "ratio",
        "its linear layers alone": "linears",
    }
    for label, key in rows.items():
        digits = 3 if key.endswith("ratio") else 2
        lines.append(f"| {label} | " + " | ".join(f"{floors[b][key]:.{digits}f}" for b in batches) + " |")
    rest = [floors[b]["served"] - floors[b]["linears"] for b in batches]
    lines.append("| the rest: norms, rotary, attention, slab, elementwise, Python | "
                 + " | ".join(f"{r:.2f}" for r in rest) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


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
    # After close: a live model thread idles beside this one, and the floor timed ~1.5x slower with it (one run).
    model = next(iter(engine.arms.values()))
    floors = {batch: floor(model, batch) for batch in results}
    title = f"{args.config}, {engine.info.dtype}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens"
    text = markdown(results, title) + floor_markdown(floors)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
