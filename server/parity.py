"""The parity gate: merged logits must match unmerged logits on fixed probe prompts before we serve.

The comparison covers every position of every probe, not just the last token, so a damaged layer that only shows on
some contexts is still caught.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from server.config import ParityConfig

# Default gates per serving dtype: float32 differs only by summation order (~1e-5 on logits of ~10);
# half dtypes round the merged weight once, which moves logits by a few ulps of their own precision.
DEFAULT_GATES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1.0),
    torch.float16: (0.25, 0.95),
    torch.bfloat16: (1.0, 0.9),
}


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    top1_agreement: float
    positions: int
    tolerance: float
    min_top1_agreement: float
    passed: bool
    # Against the unmerged model run in float32 (None when it could not be measured, e.g. offloaded weights):
    # what the serving dtype costs the merged model, and the unmerged one for comparison.
    float32_merged_max_abs_diff: float | None = None
    float32_merged_top1_agreement: float | None = None
    float32_unmerged_max_abs_diff: float | None = None

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{verdict}: max abs logit diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
            f"top-1 agreement {self.top1_agreement:.3f} over {self.positions} positions"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def probe_logits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, probes: list[str]) -> list[torch.Tensor]:
    """Float32 logits at every position of every probe, one forward per probe (no padding to reason about)."""
    device = next(model.parameters()).device
    out = []
    for text in probes:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)  # (1, T)
        out.append(model(input_ids=ids).logits[0].float().cpu())  # (T, V)
    return out


def logit_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs logit diff, share of positions whose argmax agrees) of candidate against reference."""
    diff = max((r - c).abs().max().item() for r, c in zip(reference, candidate, strict=True))
    agree = sum(int((r.argmax(-1) == c.argmax(-1)).sum().item()) for r, c in zip(reference, candidate, strict=True))
    return diff, agree / sum(r.shape[0] for r in reference)


def with_float32_reference(
    result: ParityResult, float32: list[torch.Tensor], unmerged: list[torch.Tensor], merged: list[torch.Tensor]
) -> ParityResult:
    merged_diff, merged_top1 = logit_error(float32, merged)
    return replace(
        result,
        float32_merged_max_abs_diff=merged_diff,
        float32_merged_top1_agreement=merged_top1,
        float32_unmerged_max_abs_diff=logit_error(float32, unmerged)[0],
    )


def compare_logits(
    reference: list[torch.Tensor], candidate: list[torch.Tensor], cfg: ParityConfig, dtype: torch.dtype
) -> ParityResult:
    default_tol, default_top1 = DEFAULT_GATES.get(dtype, DEFAULT_GATES[torch.float32])
    tolerance = cfg.tolerance if cfg.tolerance is not None else default_tol
    min_top1 = cfg.min_top1_agreement if cfg.min_top1_agreement is not None else default_top1
    diffs, agree, positions = [], 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        diffs.append((ref - cand).abs().max().item())
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum().item())
        positions += ref.shape[0]
    max_diff = max(diffs)
    top1 = agree / positions
    finite = all(torch.isfinite(c).all().item() for c in candidate)
    return ParityResult(
        max_abs_diff=max_diff if finite else float("inf"),
        top1_agreement=top1,
        positions=positions,
        tolerance=tolerance,
        min_top1_agreement=min_top1,
        passed=finite and max_diff <= tolerance and top1 >= min_top1,
    )
