"""Benchmark one decode step and one prefill of the demo's merged model per dtype, eager and torch.compile'd.

Method:
- The model is built by scripts/bench_serving.py's `build_merged` (float32 by the demo config); copies are cast to
  bfloat16 and float16. Variant `bf16-nomkldnn` runs the bf16 copy with `torch.backends.mkldnn` disabled, so bf16
  matmuls take ATen's own cpublas kernels (gemv at one row) instead of oneDNN. Variants `fp32-packed` and
  `bf16-packed` run copies whose linear layers the torch engine's boot packed for oneDNN (server.engine.kernels; the
  engine sends bf16 steps of one or two rows to the gemv of `bf16-nomkldnn` instead).
- Decode: input (B, 1) against a StaticCache of max_cache_len S+1 whose first S slots hold random keys/values (the
  timing does not depend on their values). Before every step the cache's write counter is reset to S, so every
  timed step writes slot S and attends over the same S+1 keys: the context never grows across reps.
- Prefill: input (1, T), no cache, logits of the last position only (as generation does).
- Timing: one warm-up call per case, then --reps rounds; within a round every variant of a shape runs once, in
  turn, so load from other processes on the shared machine hits them alike. Figures are medians over the rounds.
- On a shared machine run with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads of several processes on 2 cores
  made a decode step 10x slower than passive waiting did.
- Kernels: one call per case under torch.profiler; the top aten ops by self CPU time name the path a matmul took.
- Accuracy: each dtype's last-position logits of two chat prompts vs float32 (max |diff|), and 32 greedy tokens
  (DynamicCache `generate`) compared with float32's: the step of the first disagreement.
- Compile: `torch.compile(model.forward, dynamic=False, mode=...)` per dtype, batch and mode on the decode step;
  boot = wall time of the first call (tracing + codegen + gcc), then eager and compiled steps interleaved as above,
  and max |logit diff| compiled vs eager. Break-even tokens = boot / (eager ms - compiled ms) per step.

    python scripts/bench_decode.py [--config configs/demo.yaml] [--reps 5] [--batches 1,2,4,8] [--contexts 64,512]
        [--prefill 16,32,64,128,256,1000] [--compile-modes default,max-autotune-no-cudagraphs]
        [--compile-batches 1,8] [--out docs/bench-decode/run.md] [--json docs/bench-decode/run.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import QUESTIONS, build_merged

from server.engine.kernels import prepack_linears, should_prepack

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# variant -> (dtype key, mkldnn enabled)
PACKED = {"fp32-packed": "fp32", "bf16-packed": "bf16"}  # copies packed as the torch engine packs them
VARIANTS = {"fp32": ("fp32", True), "bf16": ("bf16", True), "fp16": ("fp16", True), "bf16-nomkldnn": ("bf16", False),
            **{name: (name, True) for name in PACKED}}  # fmt: skip
GREEDY_STEPS, TOP_KERNELS = 32, 4
Step = Callable[[], torch.Tensor]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def break_even_tokens(boot_s: float, eager_ms: float, compiled_ms: float, batch: int) -> float | None:
    """Tokens (decode steps x batch) after which compile's boot is repaid; None when the compiled step is no faster."""
    saved_ms = eager_ms - compiled_ms
    return None if saved_ms <= 0 else 1000.0 * boot_s / saved_ms * batch


@contextlib.contextmanager
def mkldnn(enabled: bool) -> Iterator[None]:
    with torch.backends.mkldnn.flags(enabled=enabled):
        yield


def static_layers(cache: StaticCache) -> list[Any]:
    """The cache's layers as StaticLayers (typed loosely: transformers annotates a union without their fields)."""
    return list(cache.layers)


def prefilled_cache(model: Any, ids: torch.Tensor) -> StaticCache:
    """A StaticCache of max_cache_len len(ids)+1 holding the model's keys/values of `ids` (B, S)."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def filled_cache(model: Any, batch: int, context: int, prefill: bool = False) -> StaticCache:
    """A StaticCache of max_cache_len context+1 whose first `context` slots hold keys/values.

    Random values for timing (a step's cost does not depend on them); with `prefill`, the model's own keys/values
    of `context` random tokens, so logits compared across eager and compiled runs are those of a real state.
    """
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    if prefill:
        return prefilled_cache(
            model, torch.randint(100, model.config.vocab_size - 100, (batch, context), generator=gen)
        )
    cache = StaticCache(config=model.config, max_cache_len=context + 1)
    model(input_ids=torch.zeros((batch, 1), dtype=torch.long), past_key_values=cache, use_cache=True)
    for layer in static_layers(cache):
        for t in (layer.keys, layer.values):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    return cache


def decode_step(forward: Callable[..., Any], cache: StaticCache, batch: int, context: int, enabled: bool) -> Step:
    """One decode call that always writes slot `context` (the counter is reset first): a fixed-size context."""
    ids = torch.full((batch, 1), 42, dtype=torch.long)
    pos = torch.full((batch, 1), context, dtype=torch.long)

    def step() -> torch.Tensor:
        for layer in static_layers(cache):
            layer.cumulative_length.fill_(context)
        with mkldnn(enabled):
            return forward(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits

    return step


def prefill_step(model: Any, tokens: int, enabled: bool) -> Step:
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, tokens), generator=gen)

    def step() -> torch.Tensor:
        with mkldnn(enabled):
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    return step


def interleaved(steps: dict[str, Step], reps: int) -> dict[str, float]:
    """Median ms per step of each case; one warm-up call each, then every case once per round, in turn."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: median_ms(t) for name, t in times.items()}


def top_kernels(step: Step) -> list[str]:
    """The aten ops with the most self CPU time in one call, as 'name ms'."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [f"{e.key} {e.self_cpu_time_total / 1000:.1f}" for e in rows[:TOP_KERNELS]]


def measure_shapes(cases: dict[str, dict[str, Step]], reps: int, profile: bool, label: str) -> list[dict[str, Any]]:
    rows = []
    for shape, steps in cases.items():
        ms = interleaved(steps, reps)
        kernels = {name: top_kernels(step) for name, step in steps.items()} if profile else {}
        rows.append({"shape": shape, "ms": ms, "kernels": kernels})
        print(f"{label} {shape}: " + " ".join(f"{n}={v:.1f}" for n, v in ms.items()), flush=True)
    return rows


@torch.inference_mode()
def bench_decode(models: dict[str, Any], batches: list[int], contexts: list[int], reps: int, profile: bool) -> list:
    cases: dict[str, dict[str, Step]] = {}
    for context in contexts:
        for batch in batches:
            caches = {key: filled_cache(m, batch, context) for key, m in models.items()}
            cases[f"B={batch} S={context}"] = {
                name: decode_step(models[key], caches[key], batch, context, enabled)
                for name, (key, enabled) in VARIANTS.items()
                if key in models  # a packed variant this CPU cannot pack is absent
            }
    return measure_shapes(cases, reps, profile, "decode")


@torch.inference_mode()
def bench_prefill(models: dict[str, Any], lengths: list[int], reps: int, profile: bool) -> list:
    cases = {
        f"T={t}": {
            name: prefill_step(models[key], t, enabled) for name, (key, enabled) in VARIANTS.items() if key in models
        }
        for t in lengths
    }
    return measure_shapes(cases, reps, profile, "prefill")


@torch.inference_mode()
def accuracy(models: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
    """Per dtype and prompt: max |last-position logit diff| vs fp32 and the first greedy step that differs."""
    rows = []
    for question in QUESTIONS[:2]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        batch = tokenizer(text, return_tensors="pt")
        outs = {}
        for key, model in models.items():
            logits = model(**batch).logits[0, -1].float()
            greedy = {"do_sample": False, "max_new_tokens": GREEDY_STEPS, "min_new_tokens": GREEDY_STEPS}
            tokens = model.generate(**batch, **greedy, pad_token_id=tokenizer.eos_token_id)[
                0, batch["input_ids"].shape[1] :
            ]
            outs[key] = (logits, tokens.tolist())
        ref_logits, ref_tokens = outs["fp32"]
        for key, (logits, tokens) in outs.items():
            first_diff = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), None)
            rows.append(
                {
                    "prompt": question[:40],
                    "dtype": key,
                    "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
                    "first_greedy_diff": first_diff,
                }
            )
    return rows


def compile_one(model: Any, batch: int, context: int, mode: str, reps: int) -> dict[str, Any]:
    """Boot time, eager vs compiled ms per decode step and max |logit diff| for one dtype, batch and mode.

    A mode ending in '+freeze' sets inductor's freezing: weights become constants, prepacked for oneDNN on CPU.
    """
    base_mode, freeze = mode.removesuffix("+freeze"), mode.endswith("+freeze")
    torch._dynamo.reset()
    eager = decode_step(model, filled_cache(model, batch, context, prefill=True), batch, context, True)
    with torch._inductor.config.patch(freezing=freeze):
        forward = torch.compile(model.forward, mode=None if base_mode == "default" else base_mode, dynamic=False)
        cache = filled_cache(model, batch, context, prefill=True)
        compiled = decode_step(forward, cache, batch, context, True)
        start = time.perf_counter()
        out = compiled()
        boot_s = time.perf_counter() - start
        diff = float((out.float() - eager().float()).abs().max())
        ms = interleaved({"eager": eager, "compiled": compiled}, reps)
    torch._dynamo.reset()
    return {
        "batch": batch,
        "mode": mode,
        "boot_s": boot_s,
        "eager_ms": ms["eager"],
        "compiled_ms": ms["compiled"],
        "max_abs_diff": diff,
        "break_even_tokens": break_even_tokens(boot_s, ms["eager"], ms["compiled"], batch),
    }


@torch.inference_mode()
def bench_compile(models: dict[str, Any], batches: list[int], context: int, modes: list[str], reps: int) -> list:
    rows = []
    for mode in modes:
        for batch in batches:
            for key, model in models.items():
                row = {"dtype": key, **compile_one(model, batch, context, mode, reps)}
                rows.append(row)
                print(f"compile {row}", flush=True)
    return rows


def shape_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    names = [name for name in VARIANTS if rows and name in rows[0]["ms"]]
    lines = [
        f"### {title} (median ms per call)",
        "",
        "| shape | " + " | ".join(names) + " | best |",
        "|---" * (len(names) + 2) + "|",
    ]
    for row in rows:
        ms = row["ms"]
        best = min(ms, key=ms.get)
        ratio = f"{best} ({ms['fp32'] / ms[best]:.2f}x fp32)"
        lines.append(f"| {row['shape']} | " + " | ".join(f"{ms[n]:.1f}" for n in names) + f" | {ratio} |")
    return [*lines, ""]


def kernel_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    lines = [
        f"### {title}: top aten ops by self CPU ms (one profiled call)",
        "",
        "| shape | variant | ops |",
        "|---|---|---|",
    ]
    for row in rows:
        for name, ops in row["kernels"].items():
            lines.append(f"| {row['shape']} | {name} | {'; '.join(ops)} |")
    return [*lines, ""]


def compile_table(rows: list[dict[str, Any]], context: int) -> list[str]:
    lines = [
        f"### torch.compile of the decode step (S={context}, dynamic=False)",
        "",
        "| dtype | B | mode | boot s | eager ms | compiled ms | speed-up | break-even tokens | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        be = "never" if r["break_even_tokens"] is None else f"{r['break_even_tokens']:.0f}"
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['mode']} | {r['boot_s']:.1f} | {r['eager_ms']:.1f} | "
            f"{r['compiled_ms']:.1f} | {r['eager_ms'] / r['compiled_ms']:.2f}x | {be} | "
            f"{r['max_abs_diff']:.3g} |"
        )
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        "# Decode and prefill per dtype (scripts/bench_decode.py)",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, "
        f"{env['reps']} reps (medians, variants interleaved within each rep; shared machine, load average at "
        f"start {env['load']}, OMP_WAIT_POLICY {env.get('omp_wait_policy', 'unset')}).",
        "",
        *shape_table(result["decode"], "Decode step, input (B, 1), context S"),
        *shape_table(result["prefill"], "Prefill, batch 1, T tokens"),
    ]
    if result["decode"] and result["decode"][0]["kernels"]:
        lines += kernel_table(result["decode"], "Decode") + kernel_table(result["prefill"], "Prefill")
    if result["compile"]:
        lines += compile_table(result["compile"], env["compile_context"])
    if not result["accuracy"]:
        return "\n".join(lines) + "\n"
    lines += [
        "### Accuracy vs float32 (eager)",
        "",
        "| prompt | dtype | max abs logit diff | first greedy diff |",
        "|---|---|---|---|",
    ]
    for r in result["accuracy"]:
        first = "none in 32" if r["first_greedy_diff"] is None else str(r["first_greedy_diff"])
        lines.append(f"| {r['prompt']} | {r['dtype']} | {r['max_abs_logit_diff']:.3g} | {first} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--contexts", type=ints, default=[64, 512])
    parser.add_argument("--prefill", type=ints, default=[16, 32, 64, 128, 256, 1000])
    parser.add_argument("--compile-modes", default="default,max-autotune-no-cudagraphs")
    parser.add_argument("--compile-batches", type=ints, default=[1, 8])
    parser.add_argument("--compile-context", type=int, default=64)
    parser.add_argument("--compile-dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--out", default="docs/bench-decode/run.md")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    import os

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, base, _ = build_merged(args.config)
    base.eval()
    models = {key: base if dtype == torch.float32 else copy.deepcopy(base).to(dtype) for key, dtype in DTYPES.items()}
    for name, key in PACKED.items():
        if not should_prepack({key: models[key]}, "auto"):  # bf16 without avx512_bf16: oneDNN refuses to pack it
            print(f"{name}: not run, {key} linears cannot be packed for oneDNN on this CPU", flush=True)
            continue
        models[name] = copy.deepcopy(models[key])
        prepack_linears(models[name])
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "compile_context": args.compile_context,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }
    result: dict[str, Any] = {"env": env, "accuracy": [] if args.no_accuracy else accuracy(models, tokenizer)}
    print(json.dumps(result["accuracy"]), flush=True)
    profile = not args.no_profile
    result["decode"] = bench_decode(models, args.batches, args.contexts, args.reps, profile)
    result["prefill"] = bench_prefill(models, args.prefill, args.reps, profile)
    modes = [m for m in args.compile_modes.split(",") if m]
    compiled = {key: models[key] for key in args.compile_dtypes.split(",") if key}
    result["compile"] = bench_compile(compiled, args.compile_batches, args.compile_context, modes, args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
