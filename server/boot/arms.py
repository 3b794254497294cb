"""Building the served arms: load the base, attach the adapters, merge as the mode says, and pass the parity gate.

Anything that makes the model unfit to serve raises `BootError` with the exit code the CLI should use: BAD_INPUT for
faulty inputs (an adapter that does not fit the base), CHECK_FAILED for a merge that fails its checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.boot.phases import PhaseTimer, log
from server.boot.stored_base import torch_base
from server.config.schema import AdapterConfig, Config
from server.engine.kernels import linear_probe
from server.errors import ExitCode
from server.load.adapters import (
    AdapterInfo,
    BootError,
    has_meta_weights,
    load_adapters,
    load_base,
    merge_refusal,
    shipped_tokenizer,
)
from server.load.policy import (
    QUANTIZED_MERGE_FIX,
    quantization_method,
    resize_vocab,
    unfilled_rows,
)
from server.merge.apply import (
    MergeError,
    lora_layers,
    merge_and_unload,
    merged_twin,
    plan,
    served_embeddings,
)
from server.merge.combine import MixSpec, deltas_on_the_side
from server.merge.merged_view import merged_view
from server.merge.parity import ParityResult, effect_expected, empty_probes, judge, probe_logits, refusal
from server.merge.precision import PLAIN_LINEAR, LinearProbe, resolve_dtype_setting
from server.merge.reference import float32_probe_logits


def _gate(result: ParityResult) -> None:
    if not result.passed:
        raise BootError(*refusal(result), exit_code=ExitCode.CHECK_FAILED)


def base_logits(peft_model: PeftModel, tokenizer: Any, probes: list[str]) -> list[torch.Tensor]:
    """The base model's probe logits (every adapter off): what the gate measures the adapters' own effect against."""
    with peft_model.disable_adapter():
        return probe_logits(peft_model, tokenizer, probes)


def refuse_quantized_merge(config: Config) -> None:
    method = quantization_method(config.model.local)
    if method and config.mode != "unmerged":
        names = ", ".join(f"'{a.name}'" for a in config.adapters)
        raise BootError(
            f"the base '{config.model.local}' is {method}-quantized, and merging into quantized weights re-quantizes "
            f"away the adapters' change (mode {config.mode})",
            QUANTIZED_MERGE_FIX,
            f"adapters {names}",
        )


def serving_tokenizer(
    adapters: list[AdapterConfig], tokenizer: PreTrainedTokenizerBase, base: PreTrainedModel
) -> tuple[PreTrainedTokenizerBase, bool]:
    """The adapter's own tokenizer (added tokens, chat template) if it ships one, with the base grown to fit it.

    Returns the tokenizer to serve and whether the base's vocabulary was resized.
    """
    chosen = shipped_tokenizer(adapters)
    if chosen is None:
        return tokenizer, False
    return chosen, resize_vocab(base, len(chosen))


@dataclass
class References:
    """The unmerged model's probe logits: in the serving dtype, and in float32 (half precision only; else None,
    with why in `skipped` when it was wanted)."""

    served: list[torch.Tensor]
    float32: list[torch.Tensor] | None
    skipped: str | None


def _references(model: Any, tokenizer: Any, probes: list[str], float32: bool, dtype: torch.dtype) -> References:
    served = probe_logits(model, tokenizer, probes)
    if dtype == torch.float32:
        return References(served, None, None)  # served in float32: the served logits are the reference
    if not float32:
        return References(served, None, "parity.float32_reference is false")
    return References(served, *float32_probe_logits(model, tokenizer, probes))


def _merge_with(peft_model: PeftModel, names: list[str], spec: MixSpec, tokenizer: Any, probes: list[str],
                float32: bool, dtype: torch.dtype) -> tuple[References, Any]:  # fmt: skip
    """(the unmerged references, merged model). The exact sum is checked against the unmerged model itself;
    TIES/DARE, which change the function on purpose, against the base with the combined deltas on the side."""
    if spec.method == "linear":
        return _references(peft_model, tokenizer, probes, float32, dtype), merge_and_unload(peft_model, names)
    deltas = plan(peft_model, names, spec)
    with deltas_on_the_side(peft_model, [(layer, deltas[n]) for n, layer in lora_layers(peft_model)]) as side:
        references = _references(side, tokenizer, probes, float32, dtype)
    return references, merge_and_unload(peft_model, names, deltas)


@dataclass
class BuiltArms:
    tokenizer: PreTrainedTokenizerBase
    arms: dict[str, torch.nn.Module]
    adapter_infos: list[AdapterInfo]
    parity: ParityResult
    reference: References  # unmerged probe logits
    candidate: list[torch.Tensor]  # merged probe logits
    dtype_reason: str
    base: list[torch.Tensor]  # the base model's probe logits, adapters off
    base_copy: Path | None = None  # the cache entry a GGUF base was read from (server.boot.stored_base)


def dtype_probe(config: Config) -> LinearProbe:
    """The kernels `dtype: auto` is timed in: the torch engine's own (prepacked where it packs); vLLM brings its own
    kernels, which mergeserve cannot run before vLLM starts, so plain `F.linear` stands in for them."""
    return linear_probe(config.engine.prepack_linear or "auto") if config.engine.kind == "torch" else PLAIN_LINEAR


def build_arms(config: Config, timer: PhaseTimer) -> BuiltArms:
    """Load, attach, merge as the mode says, and pass the parity gate (or raise BootError)."""
    names = [a.name for a in config.adapters]
    refuse_quantized_merge(config)
    dtype_name, dtype_reason = resolve_dtype_setting(config.model.dtype, dtype_probe(config))
    model_cfg, base_copy = torch_base(config, config.model.model_copy(update={"dtype": dtype_name}), timer)
    with timer.phase("load_base"):
        tokenizer, base = load_base(model_cfg, config.security.allow_pickle)
        tokenizer, resized = serving_tokenizer(config.adapters, tokenizer, base)
    dtype = cast(torch.dtype, base.dtype)
    if config.mode != "merged" and has_meta_weights(base):
        # The side path and the parity check's merged copy would read an offloaded layer's weights as stored,
        # unmerged, and the gate fails (top-1 0.9 on the tiny test model); merged mode writes each layer back.
        raise BootError(
            f"model.device_map offloads layers to disk, which mode {config.mode} does not support",
            "use mode: merged, or give the model enough memory (model.max_memory)",
            str(config.model.local),
        )
    with timer.phase("load_adapters"):
        peft_model, adapter_infos = load_adapters(base, config.adapters, allow_pickle=config.security.allow_pickle)
        if resized and (where := unfilled_rows(served_embeddings(peft_model, names))):
            listed = ", ".join(repr(n) for n in names)
            raise BootError(
                f"the adapter tokenizer adds tokens, but no adapter ships their rows of the {where}",
                "save the adapter with save_embedding_layers=True or modules_to_save",
                f"adapters {listed}",
            )
    probes, parity_cfg = config.parity.probes, config.parity
    if empty := empty_probes(tokenizer, probes):
        raise BootError(*empty, "parity.probes", ExitCode.CHECK_FAILED)
    combine = config.combine
    spec = MixSpec(combine.method, combine.density or 1.0, combine.seed)
    float32 = parity_cfg.float32_reference
    try:
        if config.mode == "merged":
            with timer.phase("merge"):
                bare = base_logits(peft_model, tokenizer, probes)  # before the merge unloads the adapters
                reference, merged = _merge_with(peft_model, names, spec, tokenizer, probes, float32, dtype)
                arms: dict[str, torch.nn.Module] = {"merged": merged}
            with timer.phase("verify"):
                candidate = probe_logits(arms["merged"], tokenizer, probes)
        elif config.mode == "ab":
            with timer.phase("merge"):
                # The merged arm shares every tensor the adapters leave alone with the unmerged arm.
                arms = {"merged": merged_twin(peft_model, names), "unmerged": peft_model}
            with timer.phase("verify"):
                bare = base_logits(peft_model, tokenizer, probes)
                reference = _references(peft_model, tokenizer, probes, float32, dtype)
                candidate = probe_logits(arms["merged"], tokenizer, probes)
        else:
            arms = {"unmerged": peft_model}
            with timer.phase("verify"):
                bare = base_logits(peft_model, tokenizer, probes)
                reference = _references(peft_model, tokenizer, probes, float32, dtype)
                with merged_view(peft_model, names) as view:
                    candidate = probe_logits(view, tokenizer, probes)
        parity = judge(
            reference.float32,
            reference.served,
            candidate,
            bare,
            parity_cfg,
            dtype,
            reference.skipped,
            effect_expected(config.adapters),
        )
    except MergeError as exc:
        raise merge_refusal(exc, ExitCode.CHECK_FAILED, "merge check failed") from None
    log.info("parity: %s", parity.summary())
    _gate(parity)
    return BuiltArms(tokenizer, arms, adapter_infos, parity, reference, candidate, dtype_reason, bare, base_copy)
