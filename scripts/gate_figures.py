"""The parity gate's verdict on an honest merge and on broken ones, for a config's base and adapters.

The gate (server.merge.parity) measures the merged model (M) and the unmerged half-precision model (U) against the
unmerged model computed in float32 (R, server.merge.reference) and refuses M when it is worse than U by more than
the stated slack. This prints, for the config's probes, what it says of:

- the honest merge (merged one layer at a time, server.merge.merged_view: no second copy of the model);
- the whole adapter dropped (the base alone);
- one module's delta dropped, for a few modules spread over the depth (`--drop`, default: the first layer's q_proj,
  a middle layer's down_proj, the last layer's o_proj): the logit gate's verdict, and the element-wise weight
  check's (server.merge.check), which every merge runs and which refuses a weight left at W0.

    python scripts/gate_figures.py CONFIG [--drop NAME ...] [--json OUT]

Memory: one copy of the model plus one layer at a time, as boot. Time on the 2-core machine: ~1 min at 1B,
~5 min at 7.4B.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config.load import load_config
from server.load.adapters import load_adapters, load_base
from server.merge.apply import base_weight, layer_delta, lora_layers
from server.merge.check import write_problem
from server.merge.merged_view import merged_view
from server.merge.parity import judge, probe_logits
from server.merge.reference import float32_probe_logits


@contextmanager
def without_delta(layer: LoraLayer) -> Iterator[None]:
    """The layer's LoRA B zeroed for the length of the block: its delta is exactly 0, as if the merge skipped it."""
    saved = {name: b.weight.detach().clone() for name, b in layer.lora_B.items()}
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.weight.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in layer.lora_B.items():
                b.weight.copy_(saved[name])


def default_drops(names: list[str]) -> list[str]:
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n})
    wanted = [(layers[0], "q_proj"), (layers[len(layers) // 2], "down_proj"), (layers[-1], "o_proj")]
    return [n for layer, kind in wanted for n in names if f".layers.{layer}." in n and n.endswith(kind)]


def row(case: str, result: Any) -> dict[str, Any]:
    out = {"case": case, "passed": result.passed, "summary": result.summary()}
    print(f"{case:50s} {'PASS' if result.passed else 'REFUSED':8s} {result.summary()}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--drop", nargs="*", help="LoRA module names whose delta to drop (one at a time)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    names = [a.name for a in config.adapters]
    tokenizer, base = load_base(config.model, config.security.allow_pickle)
    model, _ = load_adapters(base, config.adapters, allow_pickle=config.security.allow_pickle)
    dtype, probes, parity = base.dtype, config.parity.probes, config.parity
    with torch.inference_mode():
        unmerged = probe_logits(model, tokenizer, probes)
        with model.disable_adapter():
            base_only = probe_logits(model, tokenizer, probes)
    reference, why = float32_probe_logits(model, tokenizer, probes)
    if reference is None and dtype != torch.float32:
        print(f"no float32 reference: {why}", file=sys.stderr)
    rows = []

    def verdict(case: str) -> None:
        with torch.no_grad(), merged_view(model, names) as view:
            merged = probe_logits(view, tokenizer, probes)
            rows.append(row(case, judge(reference, unmerged, merged, base_only, parity, dtype)))

    verdict("honest merge")
    with torch.no_grad(), model.disable_adapter():
        dropped = probe_logits(model, tokenizer, probes)
        rows.append(row("whole adapter dropped", judge(reference, unmerged, dropped, base_only, parity, dtype)))
    layers = dict(lora_layers(model))
    for name in args.drop or default_drops(list(layers)):
        short = name.removeprefix("base_model.model.")
        # What the element-wise check says of a merge that left this weight as W0: it runs on every merge, so a
        # dropped module is refused there even where the logits cannot tell.
        w0 = base_weight(layers[name]).detach()
        with torch.no_grad():
            problem = write_problem(w0, w0, layer_delta(layers[name], names).weight)
        refused = f"refused: {problem[0]}" if problem else "passed"
        print(f"{'  element-wise check, ' + short:50s} {refused}", flush=True)
        rows.append({"case": f"element-wise check, delta of {short} dropped", "passed": problem is None,
                     "summary": refused})  # fmt: skip
        with without_delta(layers[name]):
            verdict(f"delta of {short} dropped")
    if args.json:
        args.json.write_text(json.dumps({"config": str(args.config), "dtype": str(dtype), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
