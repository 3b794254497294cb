"""Boot: load the base, attach the adapters, merge (or not), verify, warm up.

Each phase is timed, logged and reported through `on_phase`, so the app can export it before boot has finished.
Anything that makes the model unfit to serve raises `BootError` with the exit code the CLI should use: 2 for faulty
inputs (an adapter that does not fit the base), 3 for a merge that fails its checks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.config import AdapterConfig, Config, ModelConfig
from server.engine import AdapterInfo, Engine, EngineInfo
from server.merge import MergeError, lora_layers, merge_and_unload, merged_twin, temporarily_merged
from server.parity import ParityResult, compare_logits, probe_logits

log = logging.getLogger("mergeserve.boot")
PhaseCallback = Callable[[str, float], None]
EXIT_BAD_INPUT, EXIT_CHECK_FAILED = 2, 3


class BootError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


def _torch_dtype(dtype: str) -> Any:
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_base(cfg: ModelConfig, allow_pickle: bool = False) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model from a local folder or a GGUF file (which transformers dequantizes).

    Pickle checkpoints are read only when allowed, and then with weights_only=True (tensors, no code).
    """
    weights: dict[str, Any] = {}
    if cfg.path.suffix == ".gguf":
        where, files = str(cfg.path.parent), {"gguf_file": cfg.path.name}
    else:
        where, files = str(cfg.path), {}
        weights["use_safetensors"] = None if allow_pickle else True  # None: safetensors first, else .bin
    common = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": True, **files}
    tokenizer = AutoTokenizer.from_pretrained(where, **common)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=_torch_dtype(cfg.dtype), device_map=cfg.device_map, weights_only=True, **common, **weights
    )
    model.eval()
    return tokenizer, model


def _model_key(file_key: str, adapter: str) -> str:
    """PEFT stores `...q_proj.lora_A.weight` on disk and `...q_proj.lora_A.<adapter>.weight` in the model."""
    parts = file_key.split(".")
    at = next(i for i, p in enumerate(parts) if p.startswith("lora_"))
    return ".".join([*parts[: at + 1], adapter, *parts[at + 1 :]])


def _refuse(adapter: AdapterConfig, problem: str, fix: str) -> BootError:
    return BootError(f"adapter '{adapter.name}' ({adapter.path}): {problem}; fix: {fix}", EXIT_BAD_INPUT)


def _read_adapter(adapter: AdapterConfig, allow_pickle: bool) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    try:
        raw = json.loads((adapter.path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise _refuse(adapter, f"cannot read adapter_config.json ({exc})", "re-save the adapter") from None
    if not isinstance(raw, dict):
        raise _refuse(adapter, "adapter_config.json is not a JSON object", "re-save the adapter")
    if raw.get("megatron_config"):
        # PEFT would import the module that `megatron_core` names: config must never choose code to run.
        raise _refuse(adapter, "adapter_config.json sets megatron_config", "remove megatron_config and megatron_core")
    peft_config = PeftConfig.from_pretrained(str(adapter.path))
    if str(peft_config.peft_type) not in ("LORA", "PeftType.LORA"):
        raise _refuse(adapter, f"peft_type is {peft_config.peft_type}, not LORA", "give a LoRA adapter")
    if getattr(peft_config, "modules_to_save", None):
        raise _refuse(adapter, "modules_to_save is not supported yet", "retrain without modules_to_save")
    tensors = _read_weights(adapter, allow_pickle)
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise _refuse(adapter, f"tensor '{key}' holds NaN or Inf", "retrain or re-export the adapter")
    return peft_config, tensors


def _read_weights(adapter: AdapterConfig, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights, pickled = adapter.path / "adapter_model.safetensors", adapter.path / "adapter_model.bin"
    try:
        if weights.is_file():
            return load_file(str(weights))
        if allow_pickle and pickled.is_file():
            loaded = torch.load(str(pickled), map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise ValueError("not a dict of tensors")
            return loaded
    except Exception as exc:  # safetensors and torch.load raise their own error types for corrupt files
        name = weights.name if weights.is_file() else pickled.name
        raise _refuse(adapter, f"cannot read {name} ({exc})", "re-save the adapter") from None
    raise _refuse(adapter, "no adapter_model.safetensors", "save the adapter with safe_serialization=True")


def _check_all_tensors_used(model: PeftModel, adapter: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor in the file must have landed in the model, and every LoRA parameter must come from the file.

    PEFT only warns on either mismatch; an adapter half-applied that way would be served silently wrong.
    """
    params = dict(model.named_parameters())
    expected = {_model_key(k, adapter.name): v for k, v in tensors.items() if ".lora_" in k}
    unused = sorted(set(tensors) - {k for k in tensors if ".lora_" in k})
    for key, value in expected.items():
        param = params.get(key)
        if param is None:
            unused.append(key)
        elif param.shape != value.shape or not torch.equal(param.detach().cpu().to(value.dtype), value):
            raise _refuse(adapter, f"tensor '{key}' did not load as stored", "check the adapter matches the base")
    if unused:
        raise _refuse(adapter, f"tensor '{unused[0]}' matches no module of the base", "use the adapter's own base")
    missing = [k for k in params if f".{adapter.name}." in k and ".lora_" in k and k not in expected]
    if missing:
        raise _refuse(adapter, f"no stored weights for '{missing[0]}'", "re-save the adapter with all its tensors")


def load_adapters(
    base: PreTrainedModel, adapters: list[AdapterConfig], on_meta_base: bool = False, allow_pickle: bool = False
) -> tuple[PeftModel, list[AdapterInfo]]:
    """Attach every adapter as its own PEFT adapter, all active, each scaled by its configured weight.

    `on_meta_base`: the base is a skeleton on the meta device (the streaming export); the LoRA tensors are then
    assigned from the file, since PEFT would leave them on the base's (meta) device.
    """
    model: PeftModel | None = None
    infos = []
    for adapter in adapters:
        peft_config, tensors = _read_adapter(adapter, allow_pickle)
        try:
            if model is None:
                model = PeftModel.from_pretrained(
                    base, str(adapter.path), adapter_name=adapter.name, low_cpu_mem_usage=on_meta_base
                )
            else:
                model.load_adapter(str(adapter.path), adapter_name=adapter.name, low_cpu_mem_usage=on_meta_base)
            if on_meta_base:
                named = {_model_key(k, adapter.name): v for k, v in tensors.items() if ".lora_" in k}
                model.load_state_dict(named, strict=False, assign=True)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _refuse(adapter, f"does not fit the base ({first})", "use an adapter trained on this base") from None
        _check_all_tensors_used(model, adapter, tensors)
        infos.append(_adapter_info(adapter, peft_config))
    assert model is not None  # Config requires at least one adapter
    cast(Any, model.base_model).set_adapter([a.name for a in adapters])
    for _, layer in lora_layers(model):
        for adapter in adapters:
            if adapter.name in layer.scaling:
                # One place applies w_i: the unmerged forward and the merge both read the scaled s_i.
                layer.scaling[adapter.name] *= adapter.weight
    model.eval()
    return model, infos


def _adapter_info(adapter: AdapterConfig, cfg: Any) -> AdapterInfo:
    targets = cfg.target_modules
    return AdapterInfo(
        name=adapter.name,
        path=str(adapter.path),
        weight=adapter.weight,
        rank=cfg.r,
        alpha=cfg.lora_alpha,
        use_rslora=bool(cfg.use_rslora),
        target_modules=sorted(targets) if isinstance(targets, (set, list)) else [str(targets)],
    )


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


def boot(config: Config, on_phase: PhaseCallback | None = None) -> Engine:
    timer = PhaseTimer(on_phase)
    if config.mode == "merged" and config.cache.enabled:
        from server.cached_boot import boot_merged_with_cache  # it builds on this module

        return boot_merged_with_cache(config, timer)
    built = build_arms(config, timer)
    cache = {"enabled": False, "status": "disabled" if config.mode == "merged" else f"not used in {config.mode} mode"}
    return finish_boot(config, timer, built.arms, built.tokenizer, built.adapter_infos, built.parity, cache)


@dataclass
class BuiltArms:
    tokenizer: PreTrainedTokenizerBase
    arms: dict[str, torch.nn.Module]
    adapter_infos: list[AdapterInfo]
    parity: ParityResult
    reference: list[torch.Tensor]  # unmerged probe logits
    candidate: list[torch.Tensor]  # merged probe logits


def build_arms(config: Config, timer: PhaseTimer) -> BuiltArms:
    """Load, attach, merge as the mode says, and pass the parity gate (or raise BootError)."""
    names = [a.name for a in config.adapters]
    with timer.phase("load_base"):
        tokenizer, base = load_base(config.model, config.security.allow_pickle)
    dtype = cast(torch.dtype, base.dtype)
    with timer.phase("load_adapters"):
        peft_model, adapter_infos = load_adapters(base, config.adapters, allow_pickle=config.security.allow_pickle)
    probes, parity_cfg = config.parity.probes, config.parity
    try:
        if config.mode == "merged":
            with timer.phase("merge"):
                reference = probe_logits(peft_model, tokenizer, probes)
                arms: dict[str, torch.nn.Module] = {"merged": merge_and_unload(peft_model, names)}
            with timer.phase("verify"):
                candidate = probe_logits(arms["merged"], tokenizer, probes)
        elif config.mode == "ab":
            with timer.phase("merge"):
                # The merged arm shares every tensor the adapters leave alone with the unmerged arm.
                arms = {"merged": merged_twin(peft_model, names), "unmerged": peft_model}
            with timer.phase("verify"):
                reference = probe_logits(peft_model, tokenizer, probes)
                candidate = probe_logits(arms["merged"], tokenizer, probes)
        else:
            arms = {"unmerged": peft_model}
            with timer.phase("verify"):
                reference = probe_logits(peft_model, tokenizer, probes)
                with temporarily_merged(peft_model, names) as merged_view:
                    candidate = probe_logits(merged_view, tokenizer, probes)
        parity = compare_logits(reference, candidate, parity_cfg, dtype)
    except MergeError as exc:
        raise BootError(f"merge check failed: {exc}".replace(" | ", "; fix: "), EXIT_CHECK_FAILED) from None
    log.info("parity: %s", parity.summary())
    _gate(parity)
    return BuiltArms(tokenizer, arms, adapter_infos, parity, reference, candidate)


def finish_boot(
    config: Config,
    timer: PhaseTimer,
    arms: dict[str, torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    adapter_infos: list[AdapterInfo],
    parity: ParityResult,
    cache: dict[str, Any],
) -> Engine:
    """The engine over verified arms, warmed up."""
    model = next(iter(arms.values()))
    info = EngineInfo(
        model_id=config.model.model_id,
        mode=config.mode,
        adapters=adapter_infos,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        dtype_reason="configured" if config.model.dtype != "auto" else "auto: the checkpoint's dtype",
        device_map=device_summary(model),
        boot_seconds=timer.timings,
        parity=parity,
        base_path=str(Path(config.model.path)),
        cache=cache,
    )
    engine = Engine(arms, tokenizer, info, config.limits)
    with timer.phase("warmup"):
        engine.warmup()
    return engine
