"""The page scripts/bench_engines.py prints: its table, the ratios and the conditions, as markdown or plain text."""

from __future__ import annotations

from typing import Any

ROW_ORDER = ("mergeserve torch", "mergeserve vLLM", "vLLM server")
TARGET_VS_REFERENCE = 0.9  # issue 13: our HTTP layer, metrics and routing cost at most 10 %


def ratios(rows: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """merged / unmerged tokens/s per engine; mergeserve-vLLM / vLLM's server per arm; same greedy texts."""

    def rate(engine: str, arm: str, c: int) -> float | None:
        row = rows.get(f"{engine}, {arm}")
        return row["levels"][str(c)]["tokens_per_s"] if row else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    merge = {e: {str(c): div(rate(e, "merged", c), rate(e, "unmerged", c)) for c in levels}
             for e in dict.fromkeys(r["engine"] for r in rows.values())}  # fmt: skip
    vs_ref = {arm: {str(c): div(rate("mergeserve vLLM", arm, c), rate("vLLM server", arm, c)) for c in levels}
              for arm in ("merged", "unmerged")}  # fmt: skip
    same: dict[str, Any] = {}
    for arm in ("merged", "unmerged"):
        ours, ref = rows.get(f"mergeserve vLLM, {arm}"), rows.get(f"vLLM server, {arm}")
        if ours and ref:
            a, b = ours["levels"][str(levels[0])]["texts"], ref["levels"][str(levels[0])]["texts"]
            same[arm] = [sum(a[k] == b.get(k) for k in a), len(a)]
    return {"merged_over_unmerged": merge, "vllm_engine_over_reference": vs_ref, "same_text_as_reference": same,
            "target_vs_reference": TARGET_VS_REFERENCE}  # fmt: skip


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: one row per engine and arm, tokens/s, TTFT p50 and TPOT p50 per client level."""
    levels = result["settings"]["levels"]
    header = ["engine, arm"]
    for c in levels:
        header += [f"tok/s {c}c", f"TTFT p50 ms {c}c", f"TPOT p50 ms {c}c"]
    cells = []
    rows = result["rows"]
    for name in sorted(rows, key=lambda r: (ROW_ORDER.index(rows[r]["engine"]), rows[r]["arm"])):
        line = [name]
        for c in levels:
            lv = rows[name]["levels"][str(c)]
            line += [_num(lv["tokens_per_s"]), _num(lv["ttft_p50_ms"], 0), _num(lv["tpot_p50_ms"], 0)]
        cells.append(line)
    return header, cells


def _verdict(ratio: float | None, target: float) -> str:
    return "-" if ratio is None else f"{ratio:.2f} {'PASS' if ratio >= target else 'MISS'}"


def ratio_lines(result: dict[str, Any]) -> list[str]:
    levels, r = result["settings"]["levels"], result["ratios"]
    at = ", ".join(f"{{{i}}} at {c} client{'s' if c > 1 else ''}" for i, c in enumerate(levels))
    lines = ["merged / unmerged tokens/s (> 1: merging is faster):"]
    for engine, by in r["merged_over_unmerged"].items():
        lines.append(f"- {engine}: " + at.format(*(_num(by[str(c)], 2) for c in levels)))
    lines.append(f"mergeserve's vLLM engine / vLLM's own server, tokens/s (target >= {r['target_vs_reference']}):")
    for arm, by in r["vllm_engine_over_reference"].items():
        marks = [
            "-"
            if by[str(c)] is None
            else f"{by[str(c)]:.2f} {'PASS' if by[str(c)] >= r['target_vs_reference'] else 'MISS'}"
            for c in levels
        ]
        lines.append(f"- {arm}: " + at.format(*marks))
    if r["same_text_as_reference"]:
        lines.append("greedy texts, mergeserve's vLLM engine vs vLLM's own server, first repetition at 1 client:")
    for arm, (same, n) in r["same_text_as_reference"].items():
        lines.append(f"- {arm}: {same}/{n} prompts identical")
    return lines


def conditions(result: dict[str, Any]) -> list[str]:
    st, env = result["settings"], result["environment"]
    lines = [
        f"Settings: {st['prompts']} chat prompts, greedy, at most {st['new_tokens']} tokens, POST /v1/chat/completions "
        f"streamed; {st['reps']} repetition(s) per row and level after a warm-up; medians. Servers one at a time.",
        "mergeserve's vLLM engine and vLLM's own server run with the same engine arguments and environment "
        "(server.vllm_engine.settings: eager mode, the config's dtype, the same max_model_len, max_num_seqs and KV "
        "cache bytes), so the comparison is fair; eager mode is slower than vLLM's compiled graphs for both.",
        f"Machine: {env['cpus']} CPUs; 1-min load {env['load_before'][0]:.2f} before, "
        f"{env['load_after'][0]:.2f} after; "
        f"other heavy processes: {len(env['heavy_before'])} before, {len(env['heavy_after'])} after; "
        f"git {env['git']['commit'][:10]} ({len(env['git']['dirty'])} dirty); wall {env['wall_s'] / 60:.1f} min.",
    ]
    torch_engine = result.get("server_info", {}).get("mergeserve torch", {}).get("engine", {})
    if "prefix_cache_tokens" in torch_engine:
        tokens = torch_engine["prefix_cache_tokens"]
        lines.append(
            f"Prompt-prefix reuse: the torch server's engine.prefix_cache_tokens is {tokens}"
            " (the prompts repeat, so with it on every repeat prefills one token); vLLM's automatic prefix caching is"
            " on by default (its log reports the hit rate)."
        )
    if st["quick"]:
        lines.append("QUICK smoke run (1 repetition, few prompts and tokens): the figures are not a measurement.")
    for name, row in result["rows"].items():
        short = [c for c, lv in row["levels"].items() if lv["min_tokens"] < st["new_tokens"]]
        if short:
            lines.append(
                f"note: {name}: some requests stopped at EOS before {st['new_tokens']} tokens (levels {short})"
            )
        lines.append(f"{name}: 1-min load {row['load'][0]:.2f} before, {row['load'][1]:.2f} after its measurement; "
                     f"other heavy processes seen: {len(row['heavy_seen'])}")  # fmt: skip
        if "command_args" in row:
            lines.append(f"{name}: vllm.entrypoints.openai.api_server {' '.join(row['command_args'])}")
    return lines


def markdown_report(result: dict[str, Any]) -> str:
    header, cells = table(result)
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    notes = [f"- {line}" for line in conditions(result)]
    return "\n".join([*lines, "", *ratio_lines(result), "", *notes]) + "\n"


def text_report(result: dict[str, Any]) -> str:
    header, cells = table(result)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *cells]]  # fmt: skip
    return "\n".join([*lines, "", *ratio_lines(result), "", *conditions(result)]) + "\n"
