"""Plots (matplotlib) and the Markdown page of the A/B report; report.json carries every number shown here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from ab_load import ARM_MODES, LEGACY_PHASE
from ab_stats import ARMS, METRICS, Sample, values

COLORS = {"merged": "tab:blue", "unmerged": "tab:orange"}
CAVEATS = {
    "torch": "An ab server runs one decode step per busy arm per turn: with both arms in flight (mixed mode at "
    "c >= 2) each request also waits for the other arm's steps, so those per-arm figures describe the mix and their "
    "ratios are pulled towards 1; in isolated mode one arm is busy at a time and is stepped alone.",
    "vllm": "On the vLLM engine the arms are two vLLM engines, each in its own processes, sharing the machine's "
    "cores: with both in flight (mixed mode at c >= 2) each slows the other, so those per-arm figures describe the "
    "mix and their ratios are pulled towards 1; in isolated mode the other arm's engine is idle. Queue time is "
    "vLLM's own (queued to scheduled), per arm.",
}


def arms_mode(settings: dict[str, Any]) -> str:
    """isolated or mixed; a report written before --arms existed names its `phase` instead."""
    return str(settings.get("arms") or LEGACY_PHASE[settings["phase"]])


def engine_kind(info: dict[str, Any]) -> str:
    """torch or vllm: /info's `engine.kind`, or for a server whose /info lacks it, whether boot started vLLM."""
    kind = (info.get("engine") or {}).get("kind")
    return str(kind) if kind else "vllm" if "vllm_start" in (info.get("boot_seconds") or {}) else "torch"


def new_figure(ncols: int, width: float = 5.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def plot_cdf(samples: list[Sample], levels: list[int], out: Path) -> None:
    fig, axes = new_figure(len(levels), 4.5)
    for ax, level in zip(axes, levels, strict=True):
        for arm in ARMS:
            x = np.sort(values(samples, level, arm, "latency"))
            ax.step(x, np.arange(1, len(x) + 1) / max(len(x), 1), where="post", color=COLORS[arm], label=arm)
        ax.set(title=f"concurrency {level}", xlabel="request latency (s)", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Latency CDF per arm")
    fig.savefig(out / "latency_cdf.png", dpi=110)


def plot_ttft_tpot(samples: list[Sample], levels: list[int], out: Path) -> None:
    fig, axes = new_figure(2)
    for ax, metric, label in zip(axes, ("ttft", "tpot"), ("TTFT (ms)", "TPOT (ms per token)"), strict=True):
        for i, arm in enumerate(ARMS):
            data = [values(samples, level, arm, metric) * 1000 for level in levels]
            pos = [k * 3 + i for k in range(len(levels))]
            box = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=True)
            for patch in box["boxes"]:
                patch.set(facecolor=COLORS[arm], alpha=0.6)
            ax.plot([], [], color=COLORS[arm], linewidth=8, alpha=0.6, label=arm)
        ax.set_xticks([k * 3 + 0.5 for k in range(len(levels))], [f"c={level}" for level in levels])
        ax.set(ylabel=label, title=label.split(" (")[0] + " per arm and concurrency")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.savefig(out / "ttft_tpot.png", dpi=110)


def plot_throughput(report: dict[str, Any], out: Path) -> None:
    fig, axes = new_figure(2)
    levels = report["settings"]["levels"]
    for arm in ARMS:
        y = [report["levels"][str(c)]["arms"][arm]["stream_tokens_per_s_p50"] for c in levels]
        axes[0].plot(levels, y, "o-", color=COLORS[arm], label=arm)
    axes[0].set(
        title="Per-stream decode rate (median tokens/s of one request)", xlabel="concurrency", ylabel="tokens/s"
    )
    axes[1].plot(levels, [report["levels"][str(c)]["throughput"] for c in levels], "s-", color="tab:green")
    axes[1].set(title="Server throughput, both arms together", xlabel="concurrency", ylabel="tokens/s")
    for ax in axes:
        ax.set_xticks(levels)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(out / "throughput.png", dpi=110)


def plot_speedup(report: dict[str, Any], out: Path) -> None:
    fig, axes = new_figure(1, 7)
    ax = axes[0]
    for i, metric in enumerate(METRICS):
        rows = report["speedup"][metric]
        keys = list(rows)
        if not keys:
            continue
        x = np.arange(len(keys)) + (i - 1) * 0.22
        y = np.array([rows[k]["ratio"] for k in keys])
        err = np.array([[y[j] - rows[k]["lo"], rows[k]["hi"] - y[j]] for j, k in enumerate(keys)]).T
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=4, label=metric.upper())
        ax.set_xticks(np.arange(len(keys)), [f"c={k}" if k != "overall" else k for k in keys])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set(
        title="Merged speed-up: median paired unmerged / merged ratio (95% bootstrap CI)",
        ylabel="ratio (>1: merged faster)",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.savefig(out / "speedup.png", dpi=110)


# --- report --------------------------------------------------------------------------------------------------------


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def ci_line(metric: str, key: str, r: dict[str, Any]) -> str:
    where = "overall (geometric mean of levels)" if key == "overall" else f"concurrency {key}"
    return (f"- {metric.upper()} {where}: unmerged/merged = **{r['ratio']:.3f}** "
            f"(95% CI {r['lo']:.3f}-{r['hi']:.3f}): {r['verdict']}")  # fmt: skip


def in_flight_line(report: dict[str, Any]) -> str:
    """Per level, how long both arms had a request in flight (client clock); reports before it was measured: ''."""
    got = [(c, report["levels"][str(c)].get("both_arms_in_flight")) for c in report["settings"]["levels"]]
    parts = [f"c={c} {g['seconds']:.1f} s of {g['of']:.1f} s" for c, g in got if g]
    if len(parts) < len(got):
        return ""
    return "Both arms in flight together (client clock, send to last event): " + ", ".join(parts) + "."


def markdown(report: dict[str, Any]) -> str:
    st, env = report["settings"], report["environment"]
    lines = ["# A/B report: merged vs unmerged", "",
             f"Source: {report['source']}; git {env['git']['commit'][:10]} ({len(env['git']['dirty'])} dirty files).",
             f"Settings: levels {st['levels']}, {st['requests']} requests per arm per level after {st['warmup']} "
             f"warm-up pairs, max_new_tokens {st['max_new_tokens']}, greedy, "
             f"{st['resamples']} bootstrap resamples (seed {st['seed']}).",
             f"Machine: {env['cpus']} CPUs; 1-min load average {env['load_before'][0]:.2f} before, "
             f"{env['load_after'][0]:.2f} after; other benchmark/training/test processes seen during the run: "
             f"{len(env['heavy_seen'])}{' (see report.json)' if env['heavy_seen'] else ''}.", "",
             f"Arms: `{arms_mode(st)}`: {ARM_MODES[arms_mode(st)]}.", "", in_flight_line(report), ""]  # fmt: skip
    info = report["server_info"]
    for arm, i in info.items():
        adapters = ", ".join(f"{a['name']} r={a['rank']} w={a['weight']}" for a in i.get("adapters", []))
        parity = i.get("parity") or {}
        lines.append(f"- server for {arm}: engine {engine_kind(i)}, mode {i.get('mode')}, {i.get('dtype')}, "
                     f"adapters [{adapters}], parity max|dlogit| {parity.get('max_abs_diff')}")  # fmt: skip
    lines += ["", "## Per arm and concurrency (client-side, ms)", "",
              "| c | arm | n | errors | latency p50 | latency p90 | TTFT p50 | TPOT p50 | tok/s per stream | "
              "server tok/s | same greedy text (incl. warm-up) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for c in st["levels"]:
        lv = report["levels"][str(c)]
        for arm in ARMS:
            a = lv["arms"][arm]
            lines.append(f"| {c} | {arm} | {a['n']} | {a['errors']} | {ms(a['latency_p50'])} | {ms(a['latency_p90'])} "
                         f"| {ms(a['ttft_p50'])} | {ms(a['tpot_p50'])} | {a['stream_tokens_per_s_p50']:.1f} | "
                         f"{lv['throughput']:.1f} | {lv['same_text'][0]}/{lv['same_text'][1]} pairs |")  # fmt: skip
    lines += ["", "## Fair turns: queue time per arm (submission to admission, from each response's x-queue-time)",
              "", "| c | median merged ms | median unmerged ms | unmerged - merged (95% CI) | verdict | "
              "/metrics mean merged / unmerged ms |", "|---|---:|---:|---|---|---|"]  # fmt: skip
    for c in st["levels"]:
        lv = report["levels"][str(c)]
        q, b = lv.get("queue") or {}, lv.get("queue_bias") or {}
        means = " / ".join(ms((q.get(arm) or {}).get("mean")) for arm in ARMS)
        if b:
            lines.append(f"| {c} | {ms(b['median']['merged'])} | {ms(b['median']['unmerged'])} | {ms(b['diff'])} "
                         f"({ms(b['lo'])} .. {ms(b['hi'])}) | {b['verdict']} | {means} |")  # fmt: skip
        else:
            lines.append(f"| {c} | - | - | - | no x-queue-time headers | {means} |")
    lines += [
        "",
        f"## Speed-up of merged (median over prompt pairs of unmerged / merged, 95% bootstrap CI over pairs; "
        f"arms `{arms_mode(st)}`)",
        "",
    ]
    for metric in METRICS:
        lines += [ci_line(metric, key, r) for key, r in report["speedup"][metric].items()]
    kinds = sorted({engine_kind(i) for i in info.values()}) or ["torch"]
    caveats = [CAVEATS.get(k, CAVEATS["torch"]) for k in kinds]
    lines += [
        "",
        "Plots: latency_cdf.png, ttft_tpot.png, throughput.png, speedup.png.",
        "",
        "Method: see the docstring of scripts/ab_report.py. " + " ".join(caveats),
    ]
    errors = [f"c={c} {arm}: {report['levels'][str(c)]['arms'][arm]['first_error']}"
              for c in st["levels"] for arm in ARMS if report["levels"][str(c)]["arms"][arm]["errors"]]  # fmt: skip
    if errors:
        lines += ["", "## Errors (first per arm and level)", "", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], samples: list[Sample], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    levels = report["settings"]["levels"]
    (out / "report.json").write_text(json.dumps({**report, "samples": [s.as_dict() for s in samples]}, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot_cdf(samples, levels, out)
    plot_ttft_tpot(samples, levels, out)
    plot_throughput(report, out)
    plot_speedup(report, out)
