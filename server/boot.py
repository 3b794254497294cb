"""Boot: load the base, attach the adapters, merge (or not), verify, warm up.

Each phase is timed, logged and reported through `on_phase`, so the app can export it before boot has finished.
Anything that makes the model unfit to serve raises `BootError` with the exit code the CLI should use: 2 for faulty
inputs (an adapter that does not fit the base), 3 for a merge that fails its checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.adapter_checks import (
    QUANTIZED_MERGE_FIX,
    adapter_tokenizer,
    quantization_method,
    resize_vocab,
    unfilled_rows,
)
from server.config import AdapterConfig, Config
from server.engine import AdapterInfo, Engine, EngineInfo
from server.loading import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    BootError,
    _refuse,
    has_meta_weights,
    load_adapters,
    load_base,
)
from server.merge import (
    MergeError,
    lora_layers,
    merge_and_unload,
    merged_twin,
    plan,
    served_embeddings,
    temporarily_merged,
)
from server.mixing import MixSpec, deltas_on_the_side
from server.parity import ParityResult, compare_logits, probe_logits, with_float32_reference
from server.precision import can_upcast, resolve_dtype_setting, upcast

# Loading moved to server.loading; these names stay importable from here, where callers have always found them.
__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CHECK_FAILED",
    "BootError",
    "BuiltArms",
    "PhaseTimer",
    "boot",
    "build_arms",
    "device_summary",
    "finish_boot",
    "load_adapters",
    "load_base",
    "log",
]  # fmt: skip
log = logging.getLogger("mergeserve.boot")
PhaseCallback = Callable[[str, float], None]


class PhaseTimer:
    def __init__(self, on_phase: PhaseCallback | None) -> None:
        self.on_phase = on_phase
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log.info("boot phase %s: started", name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings[name] = round(seconds, 4)
        log.info("boot phase %s: done in %.2fs", name, seconds)
        if self.on_phase:
            self.on_phase(name, seconds)


def device_summary(model: torch.nn.Module) -> dict[str, int]:
    """Parameter bytes per device: enough to see where device_map put the model."""
    out: dict[str, int] = {}
    for p in model.parameters():
        out[str(p.device)] = out.get(str(p.device), 0) + p.numel() * p.element_size()
    return out


def _gate(result: ParityResult) -> None:
    if not result.passed:
        raise BootError(
            f"parity gate failed: merged vs unmerged max abs logit diff {result.max_abs_diff:.3g} "
            f"(tolerance {result.tolerance:.3g}), top-1 agreement {result.top1_agreement:.3f} "
            f"(need {result.min_top1_agreement:.3f}); refusing to serve; fix: serve unmerged or in float32",
            EXIT_CHECK_FAILED,
        )


def _refuse_quantized_merge(config: Config) -> None:
    method = quantization_method(config.model.path)
    if method and config.mode != "unmerged":
        names = ", ".join(f"'{a.name}'" for a in config.adapters)
        raise BootError(
            f"adapters {names}: the base '{config.model.path}' is {method}-quantized, and merging into quantized "
            f"weights re-quantizes away the adapters' change (mode {config.mode}); fix: {QUANTIZED_MERGE_FIX}",
            EXIT_BAD_INPUT,
        )


def serving_tokenizer(
    adapters: list[AdapterConfig], tokenizer: PreTrainedTokenizerBase, base: PreTrainedModel
) -> tuple[PreTrainedTokenizerBase, bool]:
    """The adapter's own tokenizer (added tokens, chat template) if it ships one, with the base grown to fit it.

    Returns the tokenizer to serve and whether the base's vocabulary was resized.
    """
    shipped = [(a, tok) for a in adapters if (tok := adapter_tokenizer(a.path)) is not None]
    if not shipped:
        return tokenizer, False
    first, chosen = shipped[0]
    for adapter, tok in shipped[1:]:
        if tok.get_vocab() != chosen.get_vocab():
            raise _refuse(adapter, f"its tokenizer differs from adapter '{first.name}'s", "serve them separately")
    return chosen, resize_vocab(base, len(chosen))


def _references(model: Any, tokenizer: Any, probes: list[str], float32: bool) -> tuple[list[Any], list[Any] | None]:
    """Unmerged logits in the serving dtype, and (if asked and possible) in float32 too."""
    reference = probe_logits(model, tokenizer, probes)
    if not float32:
        return reference, None
    if model.dtype == torch.float32:
        return reference, reference
    with upcast(model):
        return reference, probe_logits(model, tokenizer, probes)


def _merge_with(
    peft_model: PeftModel, names: list[str], spec: MixSpec, tokenizer: Any, probes: list[str], float32: bool
) -> tuple[list[Any], list[Any] | None, Any]:
    """(reference logits, float32 reference, merged model). The exact sum is checked against the unmerged model
    itself; TIES/DARE, which change the function on purpose, against the base with the combined deltas on the side."""
    if spec.method == "linear":
        return (*_references(peft_model, tokenizer, probes, float32), merge_and_unload(peft_model, names))
    deltas = plan(peft_model, names, spec)
    with deltas_on_the_side(peft_model, [(layer, deltas[n]) for n, layer in lora_layers(peft_model)]) as side:
        reference, reference32 = _references(side, tokenizer, probes, float32)
    return reference, reference32, merge_and_unload(peft_model, names, deltas)


def boot(config: Config, on_phase: PhaseCallback | None = None) -> Engine:
    timer = PhaseTimer(on_phase)
    if config.mode == "merged" and config.cache.enabled:
        from server.cached_boot import boot_merged_with_cache  # it builds on this module

        return boot_merged_with_cache(config, timer)
    built = build_arms(config, timer)
    cache = {"enabled": False, "status": "disabled" if config.mode == "merged" else f"not used in {config.mode} mode"}
    return finish_boot(
        config, timer, built.arms, built.tokenizer, built.adapter_infos, built.parity, cache, built.dtype_reason
    )


@dataclass
class BuiltArms:
    tokenizer: PreTrainedTokenizerBase
    arms: dict[str, torch.nn.Module]
    adapter_infos: list[AdapterInfo]
    parity: ParityResult
    reference: list[torch.Tensor]  # unmerged probe logits
    candidate: list[torch.Tensor]  # merged probe logits
    dtype_reason: str


def build_arms(config: Config, timer: PhaseTimer) -> BuiltArms:
    """Load, attach, merge as the mode says, and pass the parity gate (or raise BootError)."""
    names = [a.name for a in config.adapters]
    _refuse_quantized_merge(config)
    dtype_name, dtype_reason = resolve_dtype_setting(config.model.dtype)
    model_cfg = config.model.model_copy(update={"dtype": dtype_name})
    with timer.phase("load_base"):
        tokenizer, base = load_base(model_cfg, config.security.allow_pickle)
        tokenizer, resized = serving_tokenizer(config.adapters, tokenizer, base)
    dtype = cast(torch.dtype, base.dtype)
    if config.mode != "merged" and has_meta_weights(base):
        # The side path and the parity check's merged copy would read an offloaded layer's weights as stored,
        # unmerged, and the gate fails (top-1 0.9 on the tiny test model); merged mode writes each layer back.
        raise BootError(
            f"{config.model.path}: model.device_map offloads layers to disk, which mode {config.mode} does not "
            "support; fix: use mode: merged, or give the model enough memory (model.max_memory)",
            EXIT_BAD_INPUT,
        )
    with timer.phase("load_adapters"):
        peft_model, adapter_infos = load_adapters(base, config.adapters, allow_pickle=config.security.allow_pickle)
        if resized and (where := unfilled_rows(served_embeddings(peft_model, names))):
            listed = ", ".join(repr(n) for n in names)
            raise BootError(
                f"adapters {listed}: the adapter tokenizer adds tokens, but no adapter ships their rows of the "
                f"{where}; fix: save the adapter with save_embedding_layers=True or modules_to_save",
                EXIT_BAD_INPUT,
            )
    probes, parity_cfg = config.parity.probes, config.parity
    combine = config.combine
    spec = MixSpec(combine.method, combine.density or 1.0, combine.seed)
    float32 = parity_cfg.float32_reference and can_upcast(peft_model)
    try:
        if config.mode == "merged":
            with timer.phase("merge"):
                reference, reference32, merged = _merge_with(peft_model, names, spec, tokenizer, probes, float32)
                arms: dict[str, torch.nn.Module] = {"merged": merged}
            with timer.phase("verify"):
                candidate = probe_logits(arms["merged"], tokenizer, probes)
        elif config.mode == "ab":
            with timer.phase("merge"):
                # The merged arm shares every tensor the adapters leave alone with the unmerged arm.
                arms = {"merged": merged_twin(peft_model, names), "unmerged": peft_model}
            with timer.phase("verify"):
                reference, reference32 = _references(peft_model, tokenizer, probes, float32)
                candidate = probe_logits(arms["merged"], tokenizer, probes)
        else:
            arms = {"unmerged": peft_model}
            with timer.phase("verify"):
                reference, reference32 = _references(peft_model, tokenizer, probes, float32)
                with temporarily_merged(peft_model, names) as merged_view:
                    candidate = probe_logits(merged_view, tokenizer, probes)
        parity = compare_logits(reference, candidate, parity_cfg, dtype)
        if reference32 is not None:
            parity = with_float32_reference(parity, reference32, reference, candidate)
    except MergeError as exc:
        raise BootError(f"merge check failed: {exc}".replace(" | ", "; fix: "), EXIT_CHECK_FAILED) from None
    log.info("parity: %s", parity.summary())
    _gate(parity)
    return BuiltArms(tokenizer, arms, adapter_infos, parity, reference, candidate, dtype_reason)


def finish_boot(
    config: Config,
    timer: PhaseTimer,
    arms: dict[str, torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    adapter_infos: list[AdapterInfo],
    parity: ParityResult,
    cache: dict[str, Any],
    dtype_reason: str,
) -> Engine:
    """The engine over verified arms, warmed up."""
    model = next(iter(arms.values()))
    info = EngineInfo(
        model_id=config.model.model_id,
        mode=config.mode,
        adapters=adapter_infos,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        dtype_reason=dtype_reason,
        device_map=device_summary(model),
        boot_seconds=timer.timings,
        parity=parity,
        base_path=str(Path(config.model.path)),
        cache=cache,
        combine=config.combine.model_dump(),
    )
    engine = Engine(arms, tokenizer, info, config.limits)
    with timer.phase("warmup"):
        engine.warmup()
    return engine
