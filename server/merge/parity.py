"""The parity gate: before we serve, the merged model must compute the unmerged model's function on fixed probes.

Every position of every probe is compared, not just the last token, so a damaged layer that only shows on some
contexts is still caught. What the merged logits are compared with depends on the serving dtype:

- float32: with the unmerged model's logits, which are the exact function up to summation order (~1e-5 on logits
  of ~10). An absolute 1e-3 and full top-1 agreement.
- bfloat16/float16, the float32 reference measured (server.merge.reference, `parity.float32_reference`, the default):
  merged (M) and unmerged (U) half-precision models are two noisy approximations of one exact function, the unmerged
  model in float32 (R). Comparing M with U adds both noises, and refused honest merges of deep models (issue 27: a
  1.07B bf16 merge had top-1 agreement 0.864 against U, and a 7.4B one too). So each is measured against R, and M
  must be no worse than U by more than a stated slack: RMS error <= RMS_SLACK x U's, max error <= MAX_SLACK x U's
  (at least one rounding of the largest logit), top-1 agreement with R's argmax >= U's minus TOP1_SLACK. The
  figures behind the slacks follow.
- bfloat16/float16 without the float32 reference (switched off, or weights offloaded to disk): the former gate,
  M against U in the serving dtype, with a tolerance of HALF_TOLERANCE_ROUNDINGS roundings of the largest logit
  (twice the honest demo merge's 6.3 in bf16 and 19.5 in fp16) and top-1 agreement 0.95. /info says which reference
  was used (`reference`) and why the float32 one was skipped (`float32_skipped`).

Measured 2026-12-07 with the 3 default probes, R from server.merge.reference (on the development machine): errors
against R, "M/U" the merged model's over the unmerged one's.
                                        positions  U's RMS   M/U RMS  M/U max  top-1 U -> M
  tiny test pairs alpha/beta/rs, bf16      30      7.6e-4-9.9e-4  1.07-1.25  1.03-1.55  1.000 -> 1.000
                                 fp16      30      1.0e-4-1.3e-4  1.00-1.09  0.83-1.00  1.000 -> 1.000
  tiny alpha at weight 5/10/20,  bf16      30      1.4e-3-3.8e-3  1.42/1.05/0.89  1.60/1.24/0.90
    (deltas far above usual)     fp16      30      2.1e-4-6.7e-4  1.66/1.56/1.14  1.07/2.12/0.94
  demo SmolLM2-135M + pirate,    bf16      22      0.239     1.03     1.14     1.000 -> 0.955
                                 fp16      22      0.041     0.69     0.59     1.000 -> 1.000
  1.07B shape, all-linear r16,   bf16      22      0.0198    1.00     0.97     0.909 -> 0.955
The whole adapter dropped (the bare base served): RMS 9.7x U's (demo bf16, top-1 0.773; 1.07B bf16, top-1 0.545),
58x (demo fp16), 30-1500x (tiny pairs). One module's delta dropped: 1.08-1300x on the tiny pairs, but 0.78-2.2x
(demo bf16, all 120 modules), 0.64-9.5x (demo fp16) and 1.0-2.0x (1.07B, 8 of 112 modules): mostly inside the
noise, which no logit gate can see through. That is why the merge also checks every weight element against
W0 + delta (server.merge.check), and refuses those.
So RMS_SLACK = 2 sits 1.2x above the noisiest honest merge measured (fp16 at 5x the adapter's weight) and 4.8x
below a dropped adapter; MAX_SLACK = 3 (the max of one element is noisier) 1.4x above the noisiest honest max; and
top-1 is a coarse backstop: one flip is 0.045 of 22 positions, near-tied tokens flip either way in both models,
and TOP1_SLACK = 0.2 allows four more flips than U's own.

The adapter must be shown present: all of the above bound the merged model's error, which is just as small for a
merge that wrote nothing when the adapters barely move the probes, and a loose `parity.tolerance` passes the bare
base outright. So every gate also measures the adapters' own effect on the probes, the RMS of merged - base logits
(E), and refuses unless its RMS error against the reference in use (e) is at most MAX_ADAPTER_RATIO x E. A merge that
dropped a fraction f of the adapters' effect has e ~ f and E ~ 1 - f (in units of the whole effect), so 0.5
refuses any that lost more than a third of it; one that wrote nothing has E = 0 (merged = base), ratio infinite.
Honest merges, from the table: e is about U's RMS (M/U up to 1.66) and E about a dropped adapter's RMS (9.7x U's
on the demo in bf16, 58x in fp16, 30-1500x on the tiny pairs), so e/E <= 1.66/9.7 = 0.17 in the worst case
measured, 3x inside the bound; in float32 e is summation order (1e-7 on logits) and the ratio ~1e-6. Probes the
adapters do not move (E within the noise) cannot show them present: the fix is probes in the adapters' domain.

`parity.tolerance` and `parity.min_top1_agreement`, when set, replace the default bound on the merged model's max
abs logit error (which then bounds its RMS error too) and on its top-1 agreement, against the reference in use (R in
half precision, U otherwise).

The slack is relative to U's own error, so R must be right: a wrong R inflates both errors alike. The tests check
the layered R against a separately upcast float32 copy's forward (tests/merge/test_reference.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from server.config.schema import AdapterConfig, ParityConfig
from server.errors import Refusal

FLOAT32_TOLERANCE = 1e-3
HALF_TOLERANCE_ROUNDINGS: dict[torch.dtype, float] = {torch.bfloat16: 12.0, torch.float16: 40.0}
SERVED_TOP1 = 0.95  # M against U without a float32 reference
RMS_SLACK = 2.0
MAX_SLACK = 3.0
TOP1_SLACK = 0.2
MAX_ADAPTER_RATIO = 0.5  # the merged model's RMS error / the adapters' RMS effect on the probes (see above)


@dataclass(frozen=True)
class LogitError:
    """One model's probe logits against a reference's, over every position and vocabulary entry."""

    max_abs: float
    rms: float
    top1: float  # share of positions whose argmax agrees with the reference's
    positions: int
    finite: bool


def logit_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> LogitError:
    pairs = list(zip(reference, candidate, strict=True))
    squares = sum(float((r.double() - c.double()).pow(2).sum()) for r, c in pairs)
    elements = sum(r.numel() for r in reference)
    positions = sum(r.shape[0] for r in reference)
    agree = sum(int((r.argmax(-1) == c.argmax(-1)).sum()) for r, c in pairs)
    finite = all(bool(torch.isfinite(c).all()) for c in candidate)
    return LogitError(
        max_abs=max(float((r - c).abs().max()) for r, c in pairs) if finite else float("inf"),
        rms=(squares / elements) ** 0.5 if finite else float("inf"),
        top1=agree / positions,
        positions=positions,
        finite=finite,
    )


@dataclass(frozen=True)
class ParityResult:
    """The gate's verdict. `max_abs_diff`, `top1_agreement` (and `rms_diff` in half precision with the float32
    reference) are the merged model's errors against `reference`; `tolerance`, `min_top1_agreement` (and
    `rms_tolerance`) the bounds they were held to."""

    max_abs_diff: float
    top1_agreement: float
    positions: int
    tolerance: float
    min_top1_agreement: float
    passed: bool
    # "float32": the unmerged model in float32; "unmerged": the unmerged model in the serving dtype.
    reference: str = "unmerged"
    rms_diff: float | None = None
    rms_tolerance: float | None = None
    # Each arm against the unmerged model in float32 (None when it was not measured): what the serving dtype costs.
    float32_merged_max_abs_diff: float | None = None
    float32_merged_top1_agreement: float | None = None
    float32_merged_rms_diff: float | None = None
    float32_unmerged_max_abs_diff: float | None = None
    float32_unmerged_top1_agreement: float | None = None
    float32_unmerged_rms_diff: float | None = None
    float32_skipped: str | None = None  # why there is no float32 reference in half precision
    # The adapters' own effect on the probes (RMS of merged - base logits) and the merged model's RMS error against
    # `reference` over it, bounded by `max_adapter_ratio`; None in entries stored before they were measured.
    adapter_effect_rms: float | None = None
    adapter_ratio: float | None = None
    max_adapter_ratio: float | None = None

    def summary(self) -> str:
        return f"{'passed' if self.passed else 'FAILED'}: {self.figures()}"

    def figures(self) -> str:
        """What was compared with what, each gated figure with its bound, and (float32) the unmerged model's own."""
        against = "float32 reference" if self.reference == "float32" else "unmerged model"
        rms = ""
        if self.rms_diff is not None and self.rms_tolerance is not None:
            rms = f"RMS logit error {self.rms_diff:.3g} (tolerance {self.rms_tolerance:.3g}), "
        unmerged = ""
        if self.reference == "float32" and self.float32_unmerged_rms_diff is not None:
            unmerged = (
                f"; the unmerged model's own: RMS {self.float32_unmerged_rms_diff:.3g}, max "
                f"{self.float32_unmerged_max_abs_diff:.3g}, top-1 {self.float32_unmerged_top1_agreement:.3f}"
            )
        skipped = f" (float32 reference skipped: {self.float32_skipped})" if self.float32_skipped else ""
        adapter = ""
        if self.adapter_ratio is not None and self.max_adapter_ratio is not None:
            adapter = (
                f"; adapter ratio {self.adapter_ratio:.3g} (at most {self.max_adapter_ratio:.3g}): its RMS error "
                f"over the adapters' own effect on the probes, RMS {self.adapter_effect_rms:.3g}"
            )
        return (
            f"merged vs {against}{skipped}: {rms}max abs logit diff {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:.3g}), top-1 agreement {self.top1_agreement:.3f} "
            f"(need {self.min_top1_agreement:.3f}) over {self.positions} positions{unmerged}{adapter}"
        )

    @property
    def adapter_shown(self) -> bool:
        """Whether the probes show the adapters present (True for entries stored before this was measured)."""
        if self.adapter_ratio is None or self.max_adapter_ratio is None:
            return True
        return self.adapter_ratio <= self.max_adapter_ratio

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_ids(tokenizer: PreTrainedTokenizerBase, probes: list[str]) -> list[torch.Tensor]:
    """Each probe's token ids, (T_i,), as the tokenizer splits it alone."""
    return [tokenizer(text, return_tensors="pt").input_ids[0] for text in probes]


def empty_probes(tokenizer: PreTrainedTokenizerBase, probes: list[str]) -> Refusal | None:
    """A probe the tokenizer splits into no token (an empty one, without a BOS) has no position to compare: the
    gate would check nothing for it (and a batch of them no forward runs on)."""
    empty = [i for i, ids in enumerate(probe_ids(tokenizer, probes)) if len(ids) == 0]
    if not empty:
        return None
    return Refusal(
        f"parity probes {empty} are no token at all (the tokenizer adds no BOS), so the gate would compare no "
        "position for them; refusing to serve",
        "give parity.probes of several tokens each",
    )


@torch.inference_mode()
def probe_logits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, probes: list[str]) -> list[torch.Tensor]:
    """Float32 logits (T_i, V) at every position of every probe, from one forward over the probes as a batch.

    One batch reads every weight once instead of once per probe: at 1-8B parameters a forward over a few dozen
    tokens costs about the same as over one, the time of reading the weights. The probes are right-padded: under
    the causal mask a real token sees only earlier, real tokens, so its logits are the unpadded forward's up to the
    kernels' summation order (`tests/merge/test_reference.py` checks every position against one forward per probe),
    and each probe's rows are cut back to its own length, padding excluded.
    """
    device = next(model.parameters()).device
    ids = probe_ids(tokenizer, probes)
    lengths = [len(i) for i in ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(ids), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, (tokens, n) in enumerate(zip(ids, lengths, strict=True)):
        batch[row, :n], mask[row, :n] = tokens, 1
    logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    return [logits[row, :n].float().cpu() for row, n in enumerate(lengths)]


def _rounding(dtype: torch.dtype, logits: list[torch.Tensor]) -> float:
    """One rounding of the largest logit in `dtype`: u * max|logit|, u = 2^-8 (bf16) or 2^-11 (fp16)."""
    return torch.finfo(dtype).eps / 2 * max(float(r.abs().max()) for r in logits)


def _float32_fields(merged: LogitError, unmerged: LogitError) -> dict[str, Any]:
    return {
        "float32_merged_max_abs_diff": merged.max_abs,
        "float32_merged_top1_agreement": merged.top1,
        "float32_merged_rms_diff": merged.rms,
        "float32_unmerged_max_abs_diff": unmerged.max_abs,
        "float32_unmerged_top1_agreement": unmerged.top1,
        "float32_unmerged_rms_diff": unmerged.rms,
    }


def _served(unmerged: list[torch.Tensor], merged: list[torch.Tensor], cfg: ParityConfig, dtype: torch.dtype,
            skipped: str | None) -> ParityResult:  # fmt: skip
    """Merged against unmerged in the serving dtype: float32 serving (whose U is the exact function), or half
    precision without a float32 reference (the former gate)."""
    err = logit_error(unmerged, merged)
    if dtype in HALF_TOLERANCE_ROUNDINGS:
        default_tol, default_top1 = HALF_TOLERANCE_ROUNDINGS[dtype] * _rounding(dtype, unmerged), SERVED_TOP1
        extra: dict[str, Any] = {"float32_skipped": skipped}
    else:
        default_tol, default_top1 = FLOAT32_TOLERANCE, 1.0
        extra = _float32_fields(err, logit_error(unmerged, unmerged))  # U is the float32 reference itself
    tolerance = cfg.tolerance if cfg.tolerance is not None else default_tol
    min_top1 = cfg.min_top1_agreement if cfg.min_top1_agreement is not None else default_top1
    return ParityResult(
        max_abs_diff=err.max_abs,
        top1_agreement=err.top1,
        positions=err.positions,
        tolerance=tolerance,
        min_top1_agreement=min_top1,
        passed=err.finite and err.max_abs <= tolerance and err.top1 >= min_top1,
        reference="unmerged",
        **extra,
    )


def _against_float32(float32: list[torch.Tensor], unmerged: list[torch.Tensor], merged: list[torch.Tensor],
                     cfg: ParityConfig, dtype: torch.dtype) -> ParityResult:  # fmt: skip
    """Half precision: the merged model's error against the float32 reference, bounded by the unmerged model's own."""
    own, err = logit_error(float32, unmerged), logit_error(float32, merged)
    if cfg.tolerance is not None:
        tolerance = rms_tolerance = cfg.tolerance  # an RMS is at most the max: one bound covers both
    else:
        tolerance = max(MAX_SLACK * own.max_abs, _rounding(dtype, float32))
        rms_tolerance = RMS_SLACK * own.rms
    min_top1 = cfg.min_top1_agreement if cfg.min_top1_agreement is not None else max(own.top1 - TOP1_SLACK, 0.0)
    passed = err.finite and err.rms <= rms_tolerance and err.max_abs <= tolerance and err.top1 >= min_top1
    return ParityResult(
        max_abs_diff=err.max_abs,
        top1_agreement=err.top1,
        positions=err.positions,
        tolerance=tolerance,
        min_top1_agreement=min_top1,
        passed=passed,
        reference="float32",
        rms_diff=err.rms,
        rms_tolerance=rms_tolerance,
        **_float32_fields(err, own),
    )


def effect_expected(adapters: list[AdapterConfig]) -> bool:
    """Whether the adapters should move the probes at all: every weight 0 (the bare base, served to compare with the
    adapted model) leaves merged = base, which the adapter check would refuse as a merge that wrote nothing."""
    return any(adapter.weight != 0 for adapter in adapters)


def judge(float32: list[torch.Tensor] | None, unmerged: list[torch.Tensor], merged: list[torch.Tensor],
          base: list[torch.Tensor], cfg: ParityConfig, dtype: torch.dtype,
          skipped: str | None = None, expect_effect: bool = True) -> ParityResult:  # fmt: skip
    """The gate's verdict on merged probe logits, given the unmerged model's in the serving dtype and (half
    precision) in float32, or why those were not measured (`skipped`), and the base model's (adapters off).
    `expect_effect` False (`effect_expected`): the adapters' effect is measured and reported, not gated."""
    if dtype in HALF_TOLERANCE_ROUNDINGS and float32 is not None:
        result = _against_float32(float32, unmerged, merged, cfg, dtype)
    else:
        result = _served(unmerged, merged, cfg, dtype, skipped)
    effect = logit_error(base, merged).rms
    if not expect_effect:
        return replace(result, adapter_effect_rms=effect)
    against = float32 if result.reference == "float32" and float32 is not None else unmerged
    error = logit_error(against, merged).rms
    ratio = error / effect if effect > 0 else math.inf  # merged == base: nothing of the adapters is there
    shown = ratio <= MAX_ADAPTER_RATIO
    return replace(result, adapter_effect_rms=effect, adapter_ratio=ratio, max_adapter_ratio=MAX_ADAPTER_RATIO,
                   passed=result.passed and shown)  # fmt: skip


def refusal(result: ParityResult) -> tuple[str, str, str]:
    """(problem, fix, where) for a failed gate, naming the figures that failed."""
    if result.passed is False and not result.adapter_shown and _bounds_hold(result):
        return (
            f"the parity gate cannot show the adapters are merged: the merged model's RMS error against the "
            f"reference is {result.adapter_ratio:.3g}x the adapters' own effect on the probes (RMS "
            f"{result.adapter_effect_rms:.3g} of merged - base logits; at most {result.max_adapter_ratio:.3g}x); "
            f"{result.figures()}; refusing to serve",
            "give parity.probes on which the adapters change the output (their own domain), or serve unmerged",
            "parity.probes",
        )
    fix = "serve unmerged or in float32"
    if result.reference == "float32":
        fix += "; or, if the merge is known to be right, bound its error yourself with parity.tolerance"
    return f"parity gate failed: {result.figures()}; refusing to serve", fix, ""


def _bounds_hold(result: ParityResult) -> bool:
    """Whether the error bounds alone pass: then only the adapter ratio failed, and the refusal says so."""
    rms_ok = result.rms_diff is None or result.rms_tolerance is None or result.rms_diff <= result.rms_tolerance
    return rms_ok and result.max_abs_diff <= result.tolerance and result.top1_agreement >= result.min_top1_agreement
