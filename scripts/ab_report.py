"""A/B report: merged vs unmerged LoRA serving, measured from outside through the TGI streaming API.

Method
  * Arms: one `ab` server, where each request picks its arm with the X-Merge-Mode header (`--url`, or `--config`
    to start one here on a free loopback port), or two single-arm servers (`--merged-url`, `--unmerged-url`).
  * Load: 8 fixed ChatML questions, greedy, a fixed max_new_tokens, streamed from /generate_stream. A "pair" is one
    merged and one unmerged request for the same prompt, so both arms see the same prompts (and, greedy, should
    generate the same tokens). The first --warmup pairs of each level are sent, not counted. --arms says how the
    arms share the server at concurrency c:
      isolated (default; --phase aligned before): one arm in flight at a time. Blocks of c requests of one arm are
      sent together and waited out before the next block starts; pair k*c+i is request i of two adjacent blocks, and
      the arm that goes first swaps from one pair of blocks to the next (M U U M M U ...), so a drift in machine
      speed hits both arms alike. Each arm's figures are its own speed at concurrency c: use this to compare the
      arms (is merged faster, by how much).
      mixed (--phase staggered before): c workers each send a pair's two requests back to back, odd workers starting
      on unmerged, so at c >= 2 both arms are in flight together, as in a 50/50 A/B deployment. Each arm's figures
      include the other arm's load: use this to see what users of such a deployment get, not to rank the arms.
    At c = 1 both send one request at a time. In isolated mode a level's last block holds (requests + warmup) mod c
    pairs when that is not 0; a multiple of c keeps every block full. The page gives, per level, the seconds during
    which both arms had a request in flight (client clock): 0 in isolated mode.
  * Per request (client clock): latency = send to last event; TTFT = send to first token event;
    TPOT = (latency - TTFT) / (tokens - 1).
  * Speed-up of merged = median over pairs of unmerged / merged, for TPOT, latency and TTFT (> 1: merged is
    faster); 95 % CI by percentile bootstrap over pairs (--resamples, seed --seed). Why paired: see scripts/ab_stats.py.
    Overall: geometric mean of the per-level ratios, bootstrapped by resampling within each level. A CI that holds
    1 is reported as "no significant difference".

Either engine (`engine.kind: torch | vllm`): the load is the same HTTP; the page names the engine from /info.
Why isolated exists, stated in the report: a torch `ab` server runs one decode step per busy arm per scheduler turn,
and a vLLM one runs two engines sharing the cores, so with both arms in flight every request is slowed by the other
arm too; at c >= 2 in mixed mode the per-arm figures describe the mix, not each arm's own speed, and their ratio is
pulled towards 1. In isolated mode only one arm is busy, so a torch server steps that arm alone (the idle vLLM
engine of the other arm keeps its processes, idle).

    python scripts/ab_report.py --config configs/demo-ab.yaml --out /tmp/ab-report [--levels 1,2,4] [--requests 24]
    python scripts/ab_report.py --config configs/demo-ab.yaml --arms mixed --out /tmp/ab-report-mixed
    python scripts/ab_report.py --config configs/demo-vllm.yaml --out /tmp/ab-report-vllm    (the vLLM engine)
    python scripts/ab_report.py --url http://127.0.0.1:8080 ...
    python scripts/ab_report.py --merged-url http://127.0.0.1:8081 --unmerged-url http://127.0.0.1:8082 ...
    python scripts/ab_report.py --reanalyse --out /tmp/ab-report    (statistics and plots again from report.json)
    python scripts/ab_report.py --sweep ...   (runs scripts/ab_sweep.py; see its docstring)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from ab_load import (
    ARM_MODES,
    LEGACY_PHASE,
    Progress,
    git_state,
    heavy_processes,
    managed_server,
    run_level,
    server_info,
)
from ab_plots import arms_mode, markdown, write_outputs
from ab_stats import (
    ARMS,
    METRICS,
    Sample,
    arm_stats,
    both_arms_in_flight,
    level_throughput,
    queue_bias,
    same_text,
    speedup,
)
from local_server import check_loopback
from prometheus_client.parser import text_string_to_metric_families


@contextlib.contextmanager
def targets(args: argparse.Namespace) -> Iterator[tuple[dict[str, str], Path | None]]:
    """Which URL serves each arm, from the command line."""
    if args.config:
        with managed_server(args.config, args.boot_timeout) as (url, log):
            yield dict.fromkeys(ARMS, url), log
    elif args.url:
        yield dict.fromkeys(ARMS, check_loopback(args.url, "ab_report")), None
    else:
        merged, unmerged = (check_loopback(u, "ab_report") for u in (args.merged_url, args.unmerged_url))
        yield {"merged": merged, "unmerged": unmerged}, None


def queue_totals(urls: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Per arm, (sum, count) of the queue-time histogram on the server that serves that arm, from /metrics.

    Queue time is measured by the server from submission to admission into its arm's batch, so the difference
    between the arms' means is the scheduler's bias, free of client and network noise.
    """
    totals: dict[str, tuple[float, float]] = {}
    with httpx.Client(trust_env=False, timeout=10) as client:
        for arm, url in urls.items():
            text = client.get(f"{url}/metrics").text
            acc = [0.0, 0.0]
            for family in text_string_to_metric_families(text):
                if family.name != "mergeserve_request_queue_duration_seconds":
                    continue
                for sample in family.samples:
                    if sample.labels.get("mode") == arm and sample.name.endswith(("_sum", "_count")):
                        acc[sample.name.endswith("_count")] += sample.value
            totals[arm] = (acc[0], acc[1])
    return totals


def queue_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Mean queue seconds per arm over one level (warm-up requests included: the server cannot tell them apart)."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        n = after[arm][1] - before[arm][1]
        out[arm] = {"n": n, "mean": (after[arm][0] - before[arm][0]) / n if n else None}
    return out


def analyse(samples: list[Sample], args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    return {
        "levels": {str(c): {"arms": {arm: arm_stats(samples, c, arm) for arm in ARMS},
                            "throughput": level_throughput(samples, c) or 0.0,
                            "same_text": same_text(samples, c),
                            "both_arms_in_flight": both_arms_in_flight(samples, c),
                            "queue_bias": queue_bias(samples, c, args.resamples, args.seed)} for c in levels},
        "speedup": {m: speedup(samples, m, levels, args.resamples, args.seed) for m in METRICS},
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(c) for c in args.levels.split(",")]
    settings = {k: getattr(args, k) for k in ("requests", "warmup", "max_new_tokens", "arms", "resamples", "seed")}
    env: dict[str, Any] = {"cpus": os.cpu_count(), "git": git_state(), "load_before": os.getloadavg()}
    heavy: set[str] = set(heavy_processes())
    samples: list[Sample] = []
    queue: dict[str, Any] = {}
    print(f"ab_report: arms {args.arms}: {ARM_MODES[args.arms]}", file=sys.stderr)
    with targets(args) as (urls, log):
        info = server_info(urls)
        progress = Progress(total=len(levels) * (args.requests + args.warmup) * 2)
        for level in levels:
            before = queue_totals(urls)
            samples += asyncio.run(run_level(urls, level, args, progress))
            queue[str(level)] = queue_means(before, queue_totals(urls))
            heavy.update(heavy_processes())
            Path(args.out).mkdir(parents=True, exist_ok=True)  # kept if a later level fails
            (Path(args.out) / "samples.partial.json").write_text(json.dumps([s.as_dict() for s in samples]))
            print(f"ab_report: level {level} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    env.update(load_after=os.getloadavg(), heavy_seen=sorted(heavy), server_log=str(log) if log else None)
    source = f"ab server started from {args.config}" if args.config else f"{urls}"
    report: dict[str, Any] = {"source": source, "settings": {**settings, "levels": levels}, "environment": env,
                              "server_info": info, **analyse(samples, args, levels)}  # fmt: skip
    for key, means in queue.items():
        report["levels"][key]["queue"] = means
    write_outputs(report, samples, Path(args.out))
    (Path(args.out) / "samples.partial.json").unlink(missing_ok=True)
    return report


def reanalyse(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Statistics, page and plots again from the samples in OUT/report.json; the measured data is not touched."""
    report = json.loads((out / "report.json").read_text())
    fields = set(Sample.__dataclass_fields__)
    samples = [Sample(**{k: v for k, v in s.items() if k in fields}) for s in report.pop("samples")]
    queue = {key: level.get("queue") for key, level in report["levels"].items()}
    report["settings"].update(resamples=args.resamples, seed=args.seed, arms=arms_mode(report["settings"]))
    report.update(analyse(samples, args, report["settings"]["levels"]))
    for key, means in queue.items():
        report["levels"][key]["queue"] = means
    write_outputs(report, samples, out)
    return report


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A/B latency report, merged vs unmerged (see the module docstring).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="an ab-mode server (loopback)")
    src.add_argument("--config", help="start an ab server from this config here, on a free port")
    src.add_argument("--merged-url", help="a merged-mode server; needs --unmerged-url")
    src.add_argument("--reanalyse", action="store_true", help="recompute statistics and plots from OUT/report.json")
    p.add_argument("--unmerged-url", help="an unmerged-mode server, with --merged-url")
    p.add_argument("--sweep", action="store_true", help="run the synthetic-adapter sweep (scripts/ab_sweep.py)")
    p.add_argument("--out", default="report", help="output folder")
    p.add_argument("--levels", default="1,2,4", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=24, help="measured requests per arm per level")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per arm per level, not counted")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--arms",
        choices=list(ARM_MODES),
        default="isolated",
        help="isolated: one arm in flight at a time, to compare the arms; mixed: both at once (a 50/50 "
        "deployment); see the docstring",
    )
    p.add_argument("--phase", choices=list(LEGACY_PHASE), help="old name: aligned = --arms isolated, staggered = mixed")
    p.add_argument("--resamples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boot-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.phase:
        args.arms = LEGACY_PHASE[args.phase]
    if bool(args.merged_url) != bool(args.unmerged_url):
        p.error("--merged-url and --unmerged-url go together")
    if args.resamples < 2000 or args.requests < 2:
        p.error("need --resamples >= 2000 and --requests >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import ab_sweep

        return ab_sweep.main([a for a in argv if a != "--sweep"])
    args = parse(argv)
    report = reanalyse(Path(args.out), args) if args.reanalyse else run(args)
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
