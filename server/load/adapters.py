"""Loading the base and the adapters, with the checks that refuse what does not fit before anything is served.

Every refusal is a `BootError` with the exit code the CLI should use: ExitCode.BAD_INPUT for faulty inputs (a file that
cannot be read, an adapter for another base, a tensor that matches no module), ExitCode.CHECK_FAILED for a merge that
fails its checks (raised in boot).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.config.schema import AdapterConfig, ModelConfig
from server.errors import ExitCode, MergeserveError
from server.load.policy import adapter_tokenizer, config_refusal, kinds, missing_targets
from server.merge.apply import MergeError, check_mergeable, lora_layers


@dataclass(frozen=True)
class AdapterInfo:
    """What /info and the metrics say about one loaded adapter."""

    name: str
    path: str
    weight: float
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    kinds: list[str] = field(default_factory=list)
    source: str | None = None  # the Hub id as configured (org/name@revision); None for a local path
    sha: str | None = None  # the commit that id resolved to


class BootError(MergeserveError):
    """The model cannot be served (or exported) as configured: refused while loading, merging or checking it."""


def merge_refusal(exc: MergeError, exit_code: ExitCode, context: str = "") -> BootError:
    """A MergeError as a boot refusal; `context` ("merge check failed") goes before the adapter and module."""
    where = ": ".join(part for part in (context, exc.where) if part)
    return BootError(exc.problem, exc.fix, where, exit_code)


def _torch_dtype(dtype: str) -> Any:
    return "auto" if dtype in ("auto", "checkpoint") else getattr(torch, dtype)


def load_base(cfg: ModelConfig, allow_pickle: bool = False) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model from a local folder or a GGUF file (which transformers dequantizes).

    Pickle checkpoints are read only when allowed, and then with weights_only=True (tensors, no code).
    """
    weights: dict[str, Any] = {}
    if cfg.local.suffix == ".gguf":
        where, files = str(cfg.local.parent), {"gguf_file": cfg.local.name}
    else:
        where, files = str(cfg.local), {}
        weights["use_safetensors"] = None if allow_pickle else True  # None: safetensors first, else .bin
    common = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": True, **files}
    if cfg.max_memory is not None:
        weights["max_memory"] = cfg.max_memory
    if cfg.offload_folder is not None:
        weights["offload_folder"] = str(cfg.offload_folder)
    tokenizer = AutoTokenizer.from_pretrained(where, **common)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=_torch_dtype(cfg.dtype), device_map=cfg.device_map, weights_only=True, **common, **weights
    )
    model.eval()
    return tokenizer, model


def has_meta_weights(model: torch.nn.Module) -> bool:
    """Whether some weights sit on the meta device: layers accelerate offloaded to disk (or a skeleton)."""
    return any(p.device.type == "meta" for p in model.parameters())


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
    return BootError(problem, fix, f"adapter '{adapter.name}' ({adapter.local})")


def shipped_tokenizer(adapters: list[AdapterConfig]) -> PreTrainedTokenizerBase | None:
    """The tokenizer the adapters ship (added tokens, chat template), which is the one served; None if none does.

    Raises BootError when two adapters ship different vocabularies: one model cannot serve both."""
    shipped = [(a, tok) for a in adapters if (tok := adapter_tokenizer(a.local)) is not None]
    if not shipped:
        return None
    first, chosen = shipped[0]
    for adapter, tok in shipped[1:]:
        if tok.get_vocab() != chosen.get_vocab():
            raise _refuse(adapter, f"its tokenizer differs from adapter '{first.name}'s", "serve them separately")
    return chosen


def read_adapter_config(adapter: AdapterConfig) -> PeftConfig:
    """The adapter's PEFT config, or the refusal boot would raise for it; reads adapter_config.json only."""
    try:
        raw = json.loads((adapter.local / "adapter_config.json").read_text())
        refusal = config_refusal(raw) if isinstance(raw, dict) else ("it is not a JSON object", "re-save the adapter")
        if refusal:
            raise _refuse(adapter, *refusal)
        peft_config = PeftConfig.from_pretrained(str(adapter.local))
    except (OSError, ValueError, TypeError) as exc:  # json and PEFT's own config validation
        raise _refuse(adapter, f"cannot read adapter_config.json ({_first_line(exc)})", "re-save the adapter") from None
    if str(peft_config.peft_type) not in ("LORA", "PeftType.LORA"):
        raise _refuse(adapter, f"peft_type is {peft_config.peft_type}, not LORA", "give a LoRA adapter")
    if getattr(peft_config, "modules_to_save", None) and adapter.weight != 1.0:
        # A saved module replaces the base's whole; PEFT's unmerged forward cannot scale a replacement.
        raise _refuse(adapter, "modules_to_save replaces whole modules, which a weight cannot scale", "use weight 1.0")
    return peft_config


def _read_adapter(adapter: AdapterConfig, allow_pickle: bool) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    peft_config = read_adapter_config(adapter)
    tensors = _read_weights(adapter, allow_pickle)
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise _refuse(adapter, f"tensor '{key}' holds NaN or Inf", "retrain or re-export the adapter")
    return peft_config, tensors


def _read_weights(adapter: AdapterConfig, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights, pickled = adapter.local / "adapter_model.safetensors", adapter.local / "adapter_model.bin"
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


@contextmanager
def _no_redispatch(base: PreTrainedModel) -> Iterator[None]:
    """Hide `hf_device_map` while PEFT loads an adapter into a base with cpu/disk-offloaded layers.

    PEFT then re-dispatches the whole model, and with only cpu and disk in the map accelerate moves it with
    `.to("cpu")`, which fails on the offloaded (meta) weights. The base is already dispatched: accelerate's hooks sit
    on the base's own leaf modules, and the new LoRA factors (assigned from the file) are ordinary CPU tensors.
    """
    device_map = getattr(base, "hf_device_map", None)
    if device_map is None or not {"cpu", "disk"} & set(map(str, device_map.values())):
        yield
        return
    del base.hf_device_map
    try:
        yield
    finally:
        base.hf_device_map = device_map


def load_adapters(
    base: PreTrainedModel, adapters: list[AdapterConfig], on_meta_base: bool = False, allow_pickle: bool = False
) -> tuple[PeftModel, list[AdapterInfo]]:
    """Attach every adapter as its own PEFT adapter, all active, each scaled by its configured weight.

    `on_meta_base`: the base is a skeleton on the meta device (the streaming export); the LoRA tensors are then
    assigned from the file, since PEFT would leave them on the base's (meta) device.
    """
    model: PeftModel | None = None
    infos = []
    # A base with disk-offloaded layers holds those weights on the meta device too (accelerate loads them per
    # forward), and PEFT would create their LoRA factors on meta as well: assign them from the file instead.
    on_meta_base = on_meta_base or has_meta_weights(base)
    for adapter in adapters:
        peft_config, tensors = _read_adapter(adapter, allow_pickle)
        try:
            with _no_redispatch(base):
                if model is None:
                    model = PeftModel.from_pretrained(
                        base, str(adapter.local), adapter_name=adapter.name, low_cpu_mem_usage=on_meta_base
                    )
                else:
                    model.load_adapter(str(adapter.local), adapter_name=adapter.name, low_cpu_mem_usage=on_meta_base)
            if on_meta_base:
                # The adapter's own tensors: LoRA factors and modules_to_save copies (whole replacement modules).
                named = {_model_key(k, adapter.name): v for k, v in tensors.items()}
                named = {k: v for k, v in named.items() if ".lora_" in k or ".modules_to_save." in k}
                model.load_state_dict(named, strict=False, assign=True)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = _first_line(exc)
            raise _refuse(adapter, f"does not fit the base ({first})", "use an adapter trained on this base") from None
        if missing := missing_targets(peft_config, base):
            raise _refuse(adapter, f"target module '{missing[0]}' is not in the base", "use the adapter's own base")
        _check_all_tensors_used(model, adapter, tensors)
        infos.append(adapter_info(adapter, peft_config))
    assert model is not None  # Config requires at least one adapter
    try:
        check_mergeable(model, [a.name for a in adapters])
    except MergeError as exc:
        raise merge_refusal(exc, ExitCode.BAD_INPUT) from None
    cast(Any, model.base_model).set_adapter([a.name for a in adapters])
    for _, layer in lora_layers(model):
        for adapter in adapters:
            if adapter.name in layer.scaling:
                # One place applies w_i: the unmerged forward and the merge both read the scaled s_i.
                layer.scaling[adapter.name] *= adapter.weight
    model.eval()
    return model, infos


def adapter_info(adapter: AdapterConfig, cfg: Any) -> AdapterInfo:
    targets = cfg.target_modules
    return AdapterInfo(
        name=adapter.name,
        path=str(adapter.local),
        weight=adapter.weight,
        rank=cfg.r,
        alpha=cfg.lora_alpha,
        use_rslora=bool(cfg.use_rslora),
        kinds=kinds(cfg),
        target_modules=sorted(targets) if isinstance(targets, (set, list)) else [str(targets)],
        source=None if adapter.hub is None else str(adapter.hub),
        sha=adapter.sha,
    )
