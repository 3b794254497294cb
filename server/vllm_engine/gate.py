"""The second gate: what vLLM serves, checked against our reference before the server reports ready.

Our parity gate checks the merge in torch. vLLM then loads the checkpoint again, with its own kernels, dtype casts
and (unmerged) its own LoRA path, so the served function is checked on its own: vLLM's prompt logprobs of every
probe (log p(token_t | tokens_<t), one per position after the first) against the log-softmax of the unmerged
reference logits at the same positions (the exact function: base + adapters on the side).

Tolerances are on logprobs, per dtype. In float32 vLLM's CPU kernels agree with transformers within 3e-5 on the
demo (docs/design/vllm-probe.md); 2e-3 leaves room for longer sums on other hardware while a wrong adapter, a
missing one or a wrong scale moves logprobs by 0.1 or more. Half precision rounds each logit to 2^-8 (bf16) or
2^-11 (fp16) of its size, and the accumulation order differs between engines, so those get 0.5 and 0.15.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from server.errors import ExitCode, MergeserveError

TOLERANCES = {"float32": 2e-3, "float16": 0.15, "bfloat16": 0.5}


@dataclass(frozen=True)
class GateResult:
    arm: str
    max_abs_diff: float
    positions: int
    tolerance: float

    @property
    def passed(self) -> bool:
        # No compared position (one-token probes on a tokenizer without BOS, say) checks nothing: not a pass.
        return self.positions > 0 and self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def reference_logprobs(ids: list[int], logits: torch.Tensor) -> list[float]:
    """ids: a probe's T tokens; logits: (T, V) reference -> the T-1 logprobs of tokens 1..T-1 given their prefix."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]


def served_logprobs(ids: list[int], prompt_logprobs: list[dict[int, Any] | None]) -> list[float]:
    """vLLM's prompt_logprobs (None for the first token, then a dict holding at least the actual token)."""
    return [float(prompt_logprobs[t][ids[t]].logprob) for t in range(1, len(ids))]  # type: ignore[index]


def compare(arm: str, pairs: list[tuple[list[float], list[float]]], dtype: str) -> GateResult:
    """pairs: (reference, served) logprobs per probe."""
    diffs = [abs(r - s) for reference, served in pairs for r, s in zip(reference, served, strict=True)]
    return GateResult(arm, max(diffs, default=0.0), len(diffs), TOLERANCES.get(dtype, TOLERANCES["bfloat16"]))


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
            raise MergeserveError(
                f"vLLM serves arm '{result.arm}' off our reference: probe logprobs differ by up to "
                f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g} over {result.positions} positions); "
                "refusing to serve",
                "serve with engine.kind: torch, or in float32, and report the vLLM version",
                "vLLM gate",
                ExitCode.CHECK_FAILED,
            )
