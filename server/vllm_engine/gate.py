"""The second gate: what vLLM serves, checked against our reference before the server reports ready.

Our parity gate checks the merge in torch. vLLM then loads the checkpoint again, with its own kernels, dtype casts
and (unmerged) its own LoRA path, so the served function is checked on its own: vLLM's prompt logprobs of every
probe (log p(token_t | tokens_<t), one per position after the first) against the log-softmax of the unmerged
reference logits at the same positions (the exact function: base + adapters on the side).

Tolerances are on logprobs, per dtype, and must sit between what an honest engine differs by and what a missing
adapter moves. Measured 2026-12-07 on the vLLM test model (tests/vllm_engine/conftest.py: its two adapters at
0.7/-0.3, vLLM 0.32 on CPU), max abs logprob diff against the reference:
                     honest merged arm   honest unmerged arm   bare base served (adapters missing)
    float32                3e-5 (demo)                                   1.43
    float16                0.071                0.037                    1.43
    bfloat16               0.64                 0.14                     1.43
(the honest arms against the gate's stored reference in the serving dtype, 27 positions; the bare base against
the float32 reference, 18 positions of the engine test's prompts.) So float32 gets 2e-3 (room for longer sums on
other hardware, 700x below a missing adapter); float16 0.15 (2.1x above the honest 0.071, 9.5x below 1.43); and
bfloat16 1.0: bf16 keeps 8 significant bits, so a logit of ~100 (the test model's peaky ones) is rounded by up to
0.4 in each engine, and the honest merged arm reached 0.64 (the former 0.5 refused it); 1.0 is 1.6x above that and
1.4x below a missing adapter. That bf16 margin is thin, so a second test does not rest on it: the adapters must be
shown present (MAX_ADAPTER_RATIO, as the torch gate: the RMS error against the reference at most 0.5x the RMS of
served - base logprobs). Measured ratios: honest 0.017-0.027 (fp16) and 0.09-0.23 (bf16); the bare base served
5.1 (bf16) and 83 (fp16), its "effect" being engine noise alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from server.errors import ExitCode, MergeserveError
from server.merge.parity import MAX_ADAPTER_RATIO

TOLERANCES = {"float32": 2e-3, "float16": 0.15, "bfloat16": 1.0}


@dataclass(frozen=True)
class GateResult:
    arm: str
    max_abs_diff: float
    positions: int
    tolerance: float
    # The adapters' own effect on the served logprobs (RMS of served - base) and the RMS error against the
    # reference over it: a served model without its adapters has the error of the whole effect and no effect.
    # Both None when no effect is expected (every adapter at weight 0: the bare base), measured but not gated.
    adapter_effect_rms: float = 0.0
    adapter_ratio: float | None = math.inf
    max_adapter_ratio: float | None = MAX_ADAPTER_RATIO

    @property
    def adapter_shown(self) -> bool:
        if self.adapter_ratio is None or self.max_adapter_ratio is None:
            return True
        return self.adapter_ratio <= self.max_adapter_ratio

    @property
    def passed(self) -> bool:
        # No compared position (one-token probes on a tokenizer without BOS, say) checks nothing: not a pass.
        return self.positions > 0 and self.max_abs_diff <= self.tolerance and self.adapter_shown

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def reference_logprobs(ids: list[int], logits: torch.Tensor) -> list[float]:
    """ids: a probe's T tokens; logits: (T, V) reference -> the T-1 logprobs of tokens 1..T-1 given their prefix."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]


def served_logprobs(ids: list[int], prompt_logprobs: list[dict[int, Any] | None]) -> list[float]:
    """vLLM's prompt_logprobs (None for the first token, then a dict holding at least the actual token)."""
    return [float(prompt_logprobs[t][ids[t]].logprob) for t in range(1, len(ids))]  # type: ignore[index]


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def compare(arm: str, probes: list[tuple[list[float], list[float], list[float]]], dtype: str,
            expect_effect: bool = True) -> GateResult:  # fmt: skip
    """probes: (reference, served, base) logprobs per probe; base is the model without adapters.
    `expect_effect` False (`parity.effect_expected`): the adapters' effect is reported, not gated."""
    diffs = [r - s for reference, served, _ in probes for r, s in zip(reference, served, strict=True)]
    effects = [s - b for _, served, base in probes for s, b in zip(served, base, strict=True)]
    error, effect = _rms(diffs), _rms(effects)
    ratio = error / effect if effect > 0 else math.inf  # served == base: nothing of the adapters is there
    tolerance = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
    worst = max((abs(d) for d in diffs), default=0.0)
    if not expect_effect:
        return GateResult(arm, worst, len(diffs), tolerance, effect, None, None)
    return GateResult(arm, worst, len(diffs), tolerance, effect, ratio)


def check(results: list[GateResult]) -> None:
    """Raise (exit 3) unless every arm passed."""
    for result in results:
        if result.positions == 0:
            raise MergeserveError(
                f"the vLLM gate compared no position for arm '{result.arm}': every probe is one token long, so "
                "nothing was checked; refusing to serve",
                "give parity.probes of several tokens each",
                "parity.probes",
                ExitCode.CHECK_FAILED,
            )
        if not result.passed:
            raise _refusal(result)


def _refusal(result: GateResult) -> MergeserveError:
    figures = (
        f"probe logprobs differ by up to {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g} over "
        f"{result.positions} positions)"
    )
    if result.adapter_ratio is not None and result.max_adapter_ratio is not None:
        figures += (
            f", RMS {result.adapter_ratio:.3g}x the adapters' own effect on them (RMS {result.adapter_effect_rms:.3g}"
            f" of served - base logprobs; at most {result.max_adapter_ratio:.3g}x)"
        )
    if result.max_abs_diff <= result.tolerance:  # only the adapter ratio failed
        return MergeserveError(
            f"the vLLM gate cannot show arm '{result.arm}' serves the adapters: {figures}; refusing to serve",
            "give parity.probes on which the adapters change the output (their own domain)",
            "parity.probes",
            ExitCode.CHECK_FAILED,
        )
    return MergeserveError(
        f"vLLM serves arm '{result.arm}' off our reference: {figures}; refusing to serve",
        "serve with engine.kind: torch, or in float32, and report the vLLM version",
        "vLLM gate",
        ExitCode.CHECK_FAILED,
    )
