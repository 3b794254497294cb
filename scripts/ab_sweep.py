"""Sweep: how much slower is unmerged LoRA serving than merged, against LoRA rank and adapter count?

Method
  * Synthetic adapters on the demo base (the model section of --config), targeting all seven projections
    (q, k, v, o, gate, up, down), lora_alpha = r (scaling 1). Adapter i of rank r: PEFT's random init
    (init_lora_weights=False) under torch seed 1000 * r + i, then every lora_B multiplied by --b-scale (0.01), so the
    delta stays small, outputs stay sane and the float32 parity gate at boot passes. Built once into
    OUT/adapters/r{r}_{i}; a folder built with the same rank, seed and scale is reused.
  * Combination (r, k): adapters r{r}_0 .. r{r}_{k-1}, each with weight 1/k, served together by one `ab` server that
    ab_load starts (loopback, free port), then a concurrency-1 A/B driven by ab_load: merged, unmerged, merged, ...
    on the same 8 prompts, greedy, --warmup pairs excluded, --requests per arm, --max-new-tokens.
  * Unmerged overhead = ab_stats' paired speed-up - 1: the median over prompt pairs of TPOT unmerged / merged, with
    its percentile bootstrap 95 % CI over pairs (seed --seed) shifted by -1; request latency likewise. Combinations
    run one after another, so slow drift in machine speed is not spread evenly over them; each row records the
    load it saw.

  * The engine, limits, cache and parity sections of --config are kept (configs/demo-vllm.yaml sweeps on vLLM). A
    combination the server refuses at boot (on vLLM: the adapters' one-LoRA rank, r x k, above 512) is a row saying
    so, and the sweep goes on.

    python scripts/ab_sweep.py --config FILE --out /tmp/ab-sweep [--ranks 8,64,256] [--counts 1,2,4]
    python scripts/ab_report.py --sweep --config FILE --out /tmp/ab-sweep       (the same)
    python scripts/ab_sweep.py --reanalyse --out /tmp/ab-sweep    (statistics, page and plots again from sweep.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_load
import ab_plots
import ab_stats
from local_server import REPO

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_section(config: Path) -> dict[str, Any]:
    """The `model:` mapping of a config, with a relative path made absolute (adapters there need not exist)."""
    model = dict(yaml.safe_load(config.read_text())["model"])
    path = str(model["path"])
    if not path.startswith("package:") and not Path(path).is_absolute():
        model["path"] = str((config.resolve().parent / path).resolve())
    return model


def base_sections(config: Path) -> dict[str, Any]:
    """Every section of a config but the sweep's own (adapters, mode, ab, server): the engine (torch or vLLM), the
    limits, cache and parity settings are swept as given, with the model path made absolute."""
    raw = yaml.safe_load(config.read_text())
    kept = {k: v for k, v in raw.items() if k not in ("adapters", "mode", "ab", "server")}
    return {**kept, "model": model_section(config)}


def adapter_params(rank: int, index: int, b_scale: float) -> dict[str, Any]:
    return {"rank": rank, "index": index, "seed": 1000 * rank + index, "b_scale": b_scale, "targets": TARGETS}


def build_adapters(model: dict[str, Any], root: Path, ranks: list[int], count: int, b_scale: float) -> None:
    """Save adapters r{rank}_{i} for i < count under root, skipping those already built with the same parameters."""
    todo = [(r, i) for r in ranks for i in range(count)]
    todo = [(r, i) for r, i in todo if not _is_built(root / f"r{r}_{i}", adapter_params(r, i, b_scale))]
    if not todo:
        return
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from server.config.schema import ModelConfig
    from server.load.adapters import load_base

    _, base = load_base(ModelConfig.model_validate(model))
    for rank, index in todo:
        params = adapter_params(rank, index, b_scale)
        torch.manual_seed(params["seed"])
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(b_scale)
        folder = root / f"r{rank}_{index}"
        peft_model.save_pretrained(str(folder))
        (folder / "sweep_params.json").write_text(json.dumps(params))
        print(f"ab_sweep: built {folder}", file=sys.stderr)
        del peft_model


def _is_built(folder: Path, params: dict[str, Any]) -> bool:
    marker = folder / "sweep_params.json"
    return (
        marker.is_file()
        and json.loads(marker.read_text()) == params
        and (folder / "adapter_model.safetensors").is_file()
    )


def write_config(base: dict[str, Any], root: Path, rank: int, count: int, path: Path) -> Path:
    adapters = [
        {"name": f"r{rank}_{i}", "path": str(root / f"r{rank}_{i}"), "weight": 1.0 / count} for i in range(count)
    ]
    config = {**base, "adapters": adapters, "mode": "ab", "server": {"host": "127.0.0.1", "port": 8080}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def overhead(samples: list[ab_stats.Sample], metric: str, args: argparse.Namespace) -> dict[str, Any]:
    """unmerged/merged - 1 for the concurrency-1 level, with the bootstrap CI shifted likewise."""
    r = ab_stats.speedup(samples, metric, [1], args.resamples, args.seed).get("1")
    if r is None:
        return {"overhead": None, "lo": None, "hi": None, "verdict": "no data"}
    return {"overhead": r["ratio"] - 1, "lo": r["lo"] - 1, "hi": r["hi"] - 1, "verdict": r["verdict"]}


def run_combo(config: Path, rank: int, count: int, args: argparse.Namespace) -> tuple[dict[str, Any], list[Any]]:
    """One combination's row and samples; a combination the server refuses at boot (e.g. on vLLM a one-LoRA rank
    above 512) is a row that says so, and the sweep goes on."""
    load_before = os.getloadavg()[0]
    heavy = set(ab_load.heavy_processes())
    try:
        with ab_load.managed_server(config, args.boot_timeout) as (url, log):
            info = ab_load.server_info({"ab": url})["ab"]
            progress = ab_load.Progress((args.requests + args.warmup) * 2, f"ab_sweep rank {rank} x{count}")
            samples = asyncio.run(ab_load.run_level(dict.fromkeys(ab_stats.ARMS, url), 1, args, progress))
    except ab_load.BootFailed as exc:
        return {"rank": rank, "count": count, "refused": str(exc), "load": [load_before, os.getloadavg()[0]]}, []
    heavy.update(ab_load.heavy_processes())
    stats = {arm: ab_stats.arm_stats(samples, 1, arm) for arm in ab_stats.ARMS}
    row = {
        "rank": rank,
        "count": count,
        "tpot_ms": {arm: (stats[arm]["tpot_p50"] or float("nan")) * 1000 for arm in ab_stats.ARMS},
        "latency_ms": {arm: (stats[arm]["latency_p50"] or float("nan")) * 1000 for arm in ab_stats.ARMS},
        "tpot": overhead(samples, "tpot", args),
        "latency": overhead(samples, "latency", args),
        "n": {arm: stats[arm]["n"] for arm in ab_stats.ARMS},
        "errors": sum(stats[arm]["errors"] for arm in ab_stats.ARMS),
        "same_text": ab_stats.same_text(samples, 1),
        "parity_max_abs_diff": (info.get("parity") or {}).get("max_abs_diff"),
        "boot_seconds": info.get("boot_seconds"),
        "load": [load_before, os.getloadavg()[0]],
        "heavy_seen": sorted(heavy),
        "server_log": str(log),
    }
    return row, samples


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f}%"


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = ["# Sweep: unmerged overhead vs LoRA rank and adapter count", "",
             f"Settings: {json.dumps(settings)}.", "",
             "| rank | adapters | TPOT merged ms | TPOT unmerged ms | TPOT overhead (95% CI) | latency overhead "
             "(95% CI) | verdict (TPOT) | same text | parity max diff | load 1-min | other heavy procs |",
             "|---:|---:|---:|---:|---|---|---|---|---:|---|---:|"]  # fmt: skip
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['rank']} | {r['count']} | refused at boot ({r['refused']}) |" + " - |" * 8)
            continue
        t, lat = r["tpot"], r["latency"]
        lines.append(
            f"| {r['rank']} | {r['count']} | {r['tpot_ms']['merged']:.1f} | {r['tpot_ms']['unmerged']:.1f} | "
            f"{pct(t['overhead'])} ({pct(t['lo'])} .. {pct(t['hi'])}) | "
            f"{pct(lat['overhead'])} ({pct(lat['lo'])} .. {pct(lat['hi'])}) | {t['verdict']} | "
            f"{r['same_text'][0]}/{r['same_text'][1]} | {r['parity_max_abs_diff']:.2g} | "
            f"{r['load'][0]:.2f}-{r['load'][1]:.2f} | {len(r['heavy_seen'])} |"
        )
    lines += ["", "Overhead = median over prompt pairs of unmerged / merged - 1 (positive: unmerged slower). Each "
              "count-k row serves k adapters of that rank, each with weight 1/k. Plots: sweep_vs_rank.png, "
              "sweep_vs_count.png. Method: docstring of scripts/ab_sweep.py."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_lines(rows: list[dict[str, Any]], x_key: str, line_key: str, out: Path) -> None:
    fig, axes = ab_plots.new_figure(1, 7)
    ax = axes[0]
    lines = sorted({r[line_key] for r in rows})
    for j, value in enumerate(lines):
        sub = sorted((r for r in rows if r[line_key] == value and (r.get("tpot") or {}).get("overhead") is not None),
                     key=lambda r: r[x_key])  # fmt: skip
        x = np.array([r[x_key] for r in sub], dtype=float) * (1 + 0.04 * (j - (len(lines) - 1) / 2))
        y = np.array([r["tpot"]["overhead"] for r in sub]) * 100
        err = np.array([[r["tpot"]["overhead"] - r["tpot"]["lo"], r["tpot"]["hi"] - r["tpot"]["overhead"]]
                        for r in sub]).T * 100  # fmt: skip
        ax.errorbar(x, y, yerr=err.reshape(2, -1), fmt="o-", capsize=4, label=f"{line_key} {value}")
    ax.axhline(0, color="grey", linestyle="--", linewidth=1)
    xs = sorted({r[x_key] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.set(xlabel="LoRA rank" if x_key == "rank" else "adapters served together",
           ylabel="unmerged TPOT overhead (%)",
           title=f"Unmerged overhead vs {x_key} (median TPOT ratio - 1, 95% bootstrap CI)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out / f"sweep_vs_{x_key}.png", dpi=110)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Unmerged overhead vs LoRA rank and adapter count (see the docstring).")
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"), help="config whose model section is used")
    p.add_argument("--out", default="report/sweep")
    p.add_argument("--ranks", default="8,64,256")
    p.add_argument("--counts", default="1,2,4")
    p.add_argument("--requests", type=int, default=8, help="measured requests per arm per combination")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per arm, not counted")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--b-scale", type=float, default=0.01, help="multiplies every random lora_B")
    p.add_argument("--resamples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reanalyse", action="store_true", help="only recompute the statistics from OUT/sweep.json")
    p.add_argument("--boot-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    args.arms = "mixed"  # c = 1, one worker: one request at a time, merged, unmerged, merged, ...
    if args.resamples < 2000 or args.requests < 2:
        p.error("need --resamples >= 2000 and --requests >= 2")
    return args


def write_outputs(
    settings: dict[str, Any], rows: list[dict[str, Any]], samples: list[dict[str, Any]], out: Path
) -> None:
    (out / "sweep.json").write_text(json.dumps({"settings": settings, "rows": rows, "samples": samples}, indent=1))
    (out / "sweep.md").write_text(markdown(rows, {k: v for k, v in settings.items() if k != "git"}))
    plot_lines(rows, "rank", "count", out)
    plot_lines(rows, "count", "rank", out)


def reanalyse(out: Path, args: argparse.Namespace) -> None:
    """Recompute every row's overheads from the samples kept in sweep.json (e.g. after a change of statistic)."""
    saved = json.loads((out / "sweep.json").read_text())
    fields = {f for f in ab_stats.Sample.__dataclass_fields__}
    for row in (r for r in saved["rows"] if "refused" not in r):
        got = [ab_stats.Sample(**{k: v for k, v in s.items() if k in fields})
               for s in saved["samples"] if (s["rank"], s["count"]) == (row["rank"], row["count"])]  # fmt: skip
        row.update(tpot=overhead(got, "tpot", args), latency=overhead(got, "latency", args))
    saved["settings"].update(resamples=args.resamples, seed=args.seed)
    write_outputs(saved["settings"], saved["rows"], saved["samples"], out)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if args.reanalyse:
        reanalyse(Path(args.out), args)
        sys.stdout.write((Path(args.out) / "sweep.md").read_text())
        return 0
    ranks, counts = [int(v) for v in args.ranks.split(",")], [int(v) for v in args.counts.split(",")]
    out, config = Path(args.out), Path(args.config)
    model, base = model_section(config), base_sections(config)
    build_adapters(model, out / "adapters", ranks, max(counts), args.b_scale)
    rows, samples = [], []
    for rank in ranks:
        for count in counts:
            combo = write_config(base, out / "adapters", rank, count, out / "configs" / f"r{rank}_k{count}.yaml")
            row, got = run_combo(combo, rank, count, args)
            rows.append(row)
            samples += [{"rank": rank, "count": count, **s.as_dict()} for s in got]
            said = row.get("refused") or f"TPOT overhead {pct(row['tpot']['overhead'])}"
            print(f"ab_sweep: r={rank} k={count}: {said}", file=sys.stderr)
    settings = {k: getattr(args, k) for k in ("requests", "warmup", "max_new_tokens", "b_scale", "resamples", "seed")}
    settings.update(ranks=ranks, counts=counts, base=model["path"], git=ab_load.git_state())
    write_outputs(settings, rows, samples, out)
    sys.stdout.write((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
