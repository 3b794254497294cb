"""The markdown table of scripts/bench_scale.py, and its place in docs/benchmarks.md (one block per shape, replaced
when the same shape is measured again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from local_server import REPO

DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Real scale"


def _gib(n: float | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f}"


def _phases(info: dict[str, Any] | None) -> str:
    if not info:
        return "-"
    return ", ".join(f"{k} {v:.1f}" for k, v in info["boot_seconds"].items() if v >= 0.05)


def _rate(row: dict[str, Any], level: str) -> float | None:
    got = (row.get("levels") or {}).get(level)
    return None if got is None else float(got["tokens_per_s"])


def _row(row: dict[str, Any], model_bytes: int, bound_tps: float, levels: list[str]) -> str:
    if "refused" in row:
        return f"| {row['row']} | refused at boot: {row['refused'][:160]} |" + " |" * (3 + len(levels))
    peak = row["peak"]["all"] if "vLLM" in row["row"] else row["peak"]["server"]
    rates = [_rate(row, level) for level in levels]
    cells = [f"{r:.2f}" if r is not None else "-" for r in rates]
    of_bound = f"{rates[0] / bound_tps:.2f}" if rates and rates[0] else "-"
    return (f"| {row['row']} | {row.get('boot_s', 0):.0f} ({_phases(row.get('info'))}) | {_gib(peak)} | "
            f"{peak / model_bytes:.2f} | " + " | ".join(cells) + f" | {of_bound} |")  # fmt: skip


def table(result: dict[str, Any]) -> str:
    bound = result["read_bound"]
    model_bytes = int(bound["bytes"])
    bound_tps = bound["bytes_per_s"] / model_bytes
    levels = sorted({lv for row in result["rows"] for lv in (row.get("levels") or {})}, key=int)
    cold = result["cold_read"]
    commit = result["git"]["commit"][:7] + (" (dirty)" if result["git"]["dirty"] else "")
    head = [
        f"### {Path(result['shape_dir']).name}: {model_bytes / 1e9:.2f} GB of {result['dtype']} weights",
        "",
        f"> Measured on `{commit}` ({result['date']}), {result['machine']}: `python scripts/bench_scale.py "
        f"{result['shape_dir']}`.",
        "",
        f"`cat` of the weight files: {cold['seconds']:.1f} s "
        f"({'page cache dropped first' if cold['page_cache_dropped'] else 'page cache NOT dropped: warm read'}). "
        f"Weight-read bound: {bound['bytes_per_s'] / 1e9:.1f} GB/s, i.e. {bound_tps:.2f} tokens/s at batch 1.",
        "",
        "| row | seconds to healthy (boot phases, s) | peak RSS GiB | / model bytes | "
        + " | ".join(f"tok/s {lv} client{'s' if lv != '1' else ''}" for lv in levels)
        + " | 1 client / read bound |",
        "|---|---|---:|---:|" + "---:|" * len(levels) + "---:|",
    ]
    return "\n".join(head + [_row(row, model_bytes, bound_tps, levels) for row in result["rows"]]) + "\n"


def write_markdown(result: dict[str, Any], into_doc: bool) -> str:
    text = table(result)
    if into_doc:
        name = Path(result["shape_dir"]).name
        start, end = f"<!-- bench_scale:{name} -->", f"<!-- /bench_scale:{name} -->"
        doc = DOC.read_text()
        block = f"{start}\n{text}{end}"
        if start in doc:
            doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end) :]
        else:
            if SECTION not in doc:
                doc = doc.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by `scripts/bench_scale.py` (issue 27).\n"
            doc = doc.rstrip("\n") + f"\n\n{block}\n"
        DOC.write_text(doc)
    return text
