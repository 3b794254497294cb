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
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.adapter_checks import (
    QUANTIZED_MERGE_FIX,
    adapter_tokenizer,
    config_refusal,
    kinds,
    missing_targets,
    quantization_method,
    resize_vocab,
    unfilled_rows,
)
from server.config import AdapterConfig, Config, ModelConfig
from server.engine import AdapterInfo, Engine, EngineInfo
from server.merge import (
    MergeError,
    check_mergeable,
    lora_layers,
    merge_and_unload,
    merged_twin,
    plan,
    served_embeddings,
    temporarily_merged,
)
from server.mixing import MixSpec, deltas_on_the_side
from server.parity import ParityResult, compare_logits, probe_logits, with_float32_reference
from server.precision import can_upcast, pick_dtype, upcast

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
    return "auto" if dtype in ("auto", "checkpoint") else getattr(torch, dtype)


def load_base(cfg: ModelConfig) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model from a local folder or a GGUF file (which transformers dequantizes)."""
    if cfg.path.suffix == ".gguf":
        where, extra = str(cfg.path.parent), {"gguf_file": cfg.path.name}
    else:
        where, extra = str(cfg.path), {}
    common = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": True, **extra}
    tokenizer = AutoTokenizer.from_pretrained(where, **common)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=_torch_dtype(cfg.dtype), device_map=cfg.device_map, **common
    )
    model.eval()
    return tokenizer, model


def _model_key(file_key: str, adapter: str) -> str:
    """Where PEFT puts a stored tensor: `...q_proj.lora_A.weight` goes to `...q_proj.lora_A.<adapter>.weight`.

    DoRA's `...lora_magnitude_vector` is a module's weight; `...embed_tokens.base_layer.weight` (embedding layers saved
    with the adapter) lands in the base as is; any other tensor is a modules_to_save copy, `X.modules_to_save.<a>.w`.
    """
    parts = file_key.split(".")
    at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
    if at is not None:
        tail = parts[at + 1 :]
        if parts[at] == "lora_magnitude_vector" and not tail:
            tail = ["weight"]  # a module's weight, stored without its `.weight`
        return ".".join([*parts[: at + 1], adapter, *tail])
    if "base_layer" in parts:
        return file_key
    return ".".join([*parts[:-1], "modules_to_save", adapter, parts[-1]])


def _refuse(adapter: AdapterConfig, problem: str, fix: str) -> BootError:
    return BootError(f"adapter '{adapter.name}' ({adapter.path}): {problem}; fix: {fix}", EXIT_BAD_INPUT)


def _read_adapter(adapter: AdapterConfig) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    try:
        raw = json.loads((adapter.path / "adapter_config.json").read_text())
        refusal = config_refusal(raw) if isinstance(raw, dict) else ("it is not a JSON object", "re-save the adapter")
        if refusal:
            raise _refuse(adapter, *refusal)
        peft_config = PeftConfig.from_pretrained(str(adapter.path))
    except (OSError, ValueError, TypeError) as exc:  # json and PEFT's own config validation
        raise _refuse(adapter, f"cannot read adapter_config.json ({_first_line(exc)})", "re-save the adapter") from None
    if str(peft_config.peft_type) not in ("LORA", "PeftType.LORA"):
        raise _refuse(adapter, f"peft_type is {peft_config.peft_type}, not LORA", "give a LoRA adapter")
    if getattr(peft_config, "modules_to_save", None) and adapter.weight != 1.0:
        # A saved module replaces the base's whole; PEFT's unmerged forward cannot scale a replacement.
        raise _refuse(adapter, "modules_to_save replaces whole modules, which a weight cannot scale", "use weight 1.0")
    weights = adapter.path / "adapter_model.safetensors"
    if not weights.is_file():
        raise _refuse(adapter, "no adapter_model.safetensors", "save the adapter with safe_serialization=True")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise _refuse(adapter, f"cannot read adapter_model.safetensors ({exc})", "re-save the adapter") from None
    return peft_config, tensors


def _first_line(exc: BaseException) -> str:
    """The most telling line of a (possibly multi-line) error: torch puts the size mismatch on the second."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    telling = [line for line in lines if "size mismatch" in line or "not found" in line]
    return (telling or lines or [type(exc).__name__])[0]


def _check_all_tensors_used(model: PeftModel, adapter: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor in the file must have landed in the model, and every LoRA parameter must come from the file.

    PEFT only warns on either mismatch; an adapter half-applied that way would be served silently wrong.
    """
    params = dict(model.named_parameters(remove_duplicate=False))  # tied embeddings appear under both names
    expected = {_model_key(k, adapter.name): v for k, v in tensors.items()}
    unused: list[str] = []
    for key, value in expected.items():
        param = params.get(key)
        if param is None:
            unused.append(key)
        # Compared in the parameter's dtype: a float32 copy of an embedding or a saved module, loaded into a bf16
        # base, is rounded on the way in, and that rounding is the load working as intended.
        elif param.shape != value.shape or not torch.equal(param.detach().cpu(), value.to(param.dtype)):
            raise _refuse(adapter, f"tensor '{key}' did not load as stored", "check the adapter matches the base")
    if unused:
        raise _refuse(adapter, f"tensor '{unused[0]}' matches no module of the base", "use the adapter's own base")
    mine = [f".lora_{p}.{adapter.name}" for p in ("A", "B", "embedding_A", "embedding_B", "magnitude_vector")]
    mine.append(f".modules_to_save.{adapter.name}")
    missing = [k for k in params if k not in expected and any(f"{m}." in k or k.endswith(m) for m in mine)]
    if missing:
        raise _refuse(adapter, f"no stored weights for '{missing[0]}'", "re-save the adapter with all its tensors")


def load_adapters(base: PreTrainedModel, adapters: list[AdapterConfig]) -> tuple[PeftModel, list[AdapterInfo]]:
    """Attach every adapter as its own PEFT adapter, all active, each scaled by its configured weight."""
    model: PeftModel | None = None
    infos = []
    for adapter in adapters:
        peft_config, tensors = _read_adapter(adapter)
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(adapter.path), adapter_name=adapter.name)
            else:
                model.load_adapter(str(adapter.path), adapter_name=adapter.name)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = _first_line(exc)
            raise _refuse(adapter, f"does not fit the base ({first})", "use an adapter trained on this base") from None
        if missing := missing_targets(peft_config, base):
            raise _refuse(adapter, f"target module '{missing[0]}' is not in the base", "use the adapter's own base")
        _check_all_tensors_used(model, adapter, tensors)
        infos.append(_adapter_info(adapter, peft_config))
    assert model is not None  # Config requires at least one adapter
    try:
        check_mergeable(model, [a.name for a in adapters])
    except MergeError as exc:
        raise BootError(f"{exc}".replace(" | ", "; fix: "), EXIT_BAD_INPUT) from None
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
        kinds=kinds(cfg),
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
    names = [a.name for a in config.adapters]
    _refuse_quantized_merge(config)
    model_cfg, dtype_reason = config.model, f"configured: {config.model.dtype}"
    if model_cfg.dtype == "auto":
        chosen, dtype_reason = pick_dtype()
        model_cfg = model_cfg.model_copy(update={"dtype": chosen})
    elif model_cfg.dtype == "checkpoint":
        dtype_reason = "checkpoint: the checkpoint's own dtype"
    with timer.phase("load_base"):
        tokenizer, base = load_base(model_cfg)
        tokenizer, resized = serving_tokenizer(config.adapters, tokenizer, base)
    dtype = cast(torch.dtype, base.dtype)
    with timer.phase("load_adapters"):
        peft_model, adapter_infos = load_adapters(base, config.adapters)
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
    info = EngineInfo(
        model_id=config.model.model_id,
        mode=config.mode,
        adapters=adapter_infos,
        dtype=str(dtype).removeprefix("torch."),
        dtype_reason=dtype_reason,
        device_map=device_summary(next(iter(arms.values()))),
        boot_seconds=timer.timings,
        parity=parity,
        base_path=str(Path(config.model.path)),
        combine=combine.model_dump(),
    )
    engine = Engine(arms, tokenizer, info, config.limits)
    with timer.phase("warmup"):
        engine.warmup()
    return engine
