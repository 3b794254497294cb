"""Benchmark the half-precision linear kernel (server.engine.half_linear) against `F.linear`, at the decode shapes of
the 1B and 8B scale models, and a 1B-shape bf16 decode step through the torch engine with and without it.

Method:
- Linear layers: per dtype, shape (out x in) and row count, a pool of distinct weights of that shape totalling at
  least --pool-mib (default 512 MiB, 16x this CPU's L3) is cycled, so every call reads its weight from memory as a
  decode step does. `F.linear` runs as the engine ran it before: oneDNN off at <= 2 rows (`small_rows_scope`), on
  above. One warm-up pass over the pool, then --reps passes in which the two kernels alternate; GB/s = the pool's
  bytes / the median pass time. The read bound is one pass of `torch.amax` over the same pool viewed as int16 (each
  byte read once, vectorised over every core), best of the reps: what any kernel reading these weights can reach.
- Decode: a model written by `scripts/make_scale_model.py 1b DIR` (--model DIR/base), loaded in bf16 with slab
  attention; one --context-token prompt prefilled per row, then decode steps of --batches rows through the fused
  decode kernels (server.engine.fused_decode). Every step writes the same column (the slab's lengths are not
  advanced), so the context is fixed. "with" routes the linear layers through the kernel (`route_half_linears`,
  the boot's own), "without" gives the same `HalfLinear`s `F.linear` (what nn.Linear runs); the two alternate
  step by step; tokens/s = rows / the median step time. Read bound in tokens/s = amax GB/s / the model's bytes.
- The machine is shared: each figure carries the 1-minute load average seen when it was taken. The decode part holds
  a 2.2 GB model: run it under `flock /tmp/mergeserve-heavy.lock`. Use OMP_WAIT_POLICY=PASSIVE on a shared machine.

    flock /tmp/mergeserve-heavy.lock env OMP_WAIT_POLICY=PASSIVE python scripts/bench_half_linear.py \\
        [--model /work/scale/1b/base] [--dtypes bfloat16,float16] [--rows 1,8] [--reps 7] [--batches 1,8] \\
        [--context 32] [--steps 7] [--no-decode] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.engine.attention import use_slab_attention
from server.engine.decoder import direct_stack
from server.engine.fused_decode import decode_step
from server.engine.half_linear import HalfLinear, route_half_linears
from server.engine.kernels import GEMV_MAX_ROWS
from server.engine.kv_slab import KVSlab, forward
from server.engine.slab_ops import load_slab_ops

# (name, out, in) of each distinct linear shape of a decoder layer and the head (vocabulary 49152: the demo tokenizer).
SHAPES = {
    "1b": [("q/o", 2048, 2048), ("k/v", 512, 2048), ("gate/up", 8192, 2048), ("down", 2048, 8192),
           ("head", 49152, 2048)],
    "8b": [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336),
           ("head", 49152, 4096)],
}  # fmt: skip
Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load() -> float:
    return os.getloadavg()[0]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def pool_of(out: int, inner: int, dtype: torch.dtype, pool_bytes: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(out * 31 + inner)
    count = max(1, -(-pool_bytes // (out * inner * 2)))
    return [torch.randn(out, inner, generator=gen).to(dtype) for _ in range(count)]


def read_bound(pool: list[torch.Tensor], reps: int) -> float:
    """GB/s of the fastest amax pass over the pool's bytes (int16 words: no conversion, one read of each byte)."""
    words = [w.view(torch.int16) for w in pool]
    best = float("inf")
    for _ in range(reps + 1):
        start = time.perf_counter()
        for w in words:
            torch.amax(w)
        best = min(best, time.perf_counter() - start)
    return sum(w.numel() * 2 for w in words) / best / 1e9


def passes(kernels: dict[str, Linear], pool: list[torch.Tensor], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of one pass over the pool per kernel; a warm-up pass each, then the kernels alternate."""
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for rep in range(reps + 1):
        for name, run in kernels.items():
            # F.linear as the engine ran bf16 before: ATen's gemv at <= GEMV_MAX_ROWS rows (small_rows_scope)
            onednn = name != "F.linear" or x.shape[0] > GEMV_MAX_ROWS
            with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=onednn):
                start = time.perf_counter()
                for w in pool:
                    run(x, w)
                if rep:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_linears(ops: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    kernels: dict[str, Linear] = {"kernel": lambda x, w: ops.half_linear(x, w, None), "F.linear": F.linear}
    rows_out = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for model, shapes in SHAPES.items():
            for name, out, inner in shapes:
                pool = pool_of(out, inner, dtype, args.pool_mib << 20)
                nbytes = sum(w.numel() * 2 for w in pool)
                bound = read_bound(pool, args.reps)
                for rows in args.rows:
                    x = torch.randn(rows, inner).to(dtype)
                    seconds = passes(kernels, pool, x, args.reps)
                    row = {"dtype": dtype_name, "model": model, "layer": name, "out": out, "in": inner, "rows": rows,
                           "bound_gbs": bound, "load": load(),
                           **{f"{k}_gbs": nbytes / s / 1e9 for k, s in seconds.items()}}  # fmt: skip
                    rows_out.append(row)
                    print(f"{dtype_name} {model} {name} {out}x{inner} rows {rows}: kernel {row['kernel_gbs']:.1f} "
                          f"GB/s, F.linear {row['F.linear_gbs']:.1f}, read bound {bound:.1f} "
                          f"(kernel {row['kernel_gbs'] / bound:.2f}x of it), load {row['load']:.1f}",
                          flush=True)  # fmt: skip
                del pool
    return rows_out


def _prefilled(lm: Any, stack: Any, batch: int, context: int) -> KVSlab:
    slab = KVSlab(batch)
    gen = torch.Generator().manual_seed(context)
    for slot in range(batch):
        prompt = torch.randint(100, lm.config.vocab_size - 100, (1, context), generator=gen)
        forward(lm, slab, torch.tensor([slot]), prompt, [0], [context - 1], stack)
        slab.lengths[slot] = context
    return slab


def bench_decode(ops: Any, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    assert use_slab_attention(lm)
    nbytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    words = [p.detach().view(-1).view(torch.int16) for p in lm.parameters()]
    bound = read_bound(words, 3)
    counts = route_half_linears({"m": lm}, ops)
    assert counts.get("m"), "the kernel does not apply to this model here (native bf16? no AVX2?)"
    layers = [m for m in lm.modules() if isinstance(m, HalfLinear)]
    stack = direct_stack(lm)
    result: dict[str, Any] = {"model_bytes": nbytes, "read_bound_gbs": bound,
                              "read_bound_tokens_per_s": bound * 1e9 / nbytes, "batches": {}}  # fmt: skip
    with torch.inference_mode():
        for batch in args.batches:
            slab = _prefilled(lm, stack, batch, args.context)
            tokens = torch.full((batch, 1), 42, dtype=torch.long)
            times: dict[str, list[float]] = {"with": [], "without": []}
            for step in range(args.steps + 1):
                for variant in times:
                    for layer in layers:
                        layer.op = ops.half_linear if variant == "with" else F.linear
                    start = time.perf_counter()
                    assert decode_step(ops, stack, slab, tokens) is not None
                    if step:  # the first step of each is a warm-up
                        times[variant].append(time.perf_counter() - start)
            speeds = {v: batch / statistics.median(t) for v, t in times.items()}
            result["batches"][batch] = {**{f"{v}_tokens_per_s": s for v, s in speeds.items()}, "load": load()}
            steps = speeds["with"] / batch / result["read_bound_tokens_per_s"]
            print(f"decode bf16 {args.model} batch {batch}: with the kernel {speeds['with']:.2f} tokens/s, without "
                  f"{speeds['without']:.2f} ({speeds['with'] / speeds['without']:.2f}x); read bound "
                  f"{result['read_bound_tokens_per_s']:.2f} steps/s (with: {steps:.2f}x of it), load {load():.1f}",
                  flush=True)  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/scale/1b/base")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--rows", type=ints, default=[1, 8])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pool-mib", type=int, default=512)
    parser.add_argument("--batches", type=ints, default=[1, 8])
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--no-linears", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    ops = load_slab_ops("on", torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load():.1f}", flush=True)
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    if not args.no_linears:
        result["linears"] = bench_linears(ops, args)
    if not args.no_decode:
        result["decode"] = bench_decode(ops, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
