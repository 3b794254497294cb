"""What an adapter's config says about whether we can merge it exactly, and what it needs from the base.

Read before PEFT touches the base: loading a PiSSA/OLoRA/CorDA adapter re-runs its initialisation, which rewrites the
base weights (W0 - sBA from an SVD) before the stored A and B are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.errors import Refusal

# init_lora_weights values whose adapter is only correct on a base the initialisation itself modified. PEFT's
# save_pretrained(path_initial_model_for_weight_conversion=...) turns them into a plain LoRA of rank 2r against the
# original base and records init_lora_weights=True; that converted form is what we accept.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")
# LoRA variants PEFT implements whose forward is not W0 x + delta x with a delta we compute.
_UNSUPPORTED = {
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Quantized checkpoints whose weights cannot take an exact float delta: merging re-quantizes and loses it.
QUANTIZED_MERGE_FIX = "merge into the float16/bfloat16 base checkpoint, or serve with mode: unmerged"


def config_refusal(raw: dict[str, Any]) -> Refusal | None:
    """(problem, fix) if this adapter_config.json (as read, before PEFT parses it) cannot be merged exactly."""
    if raw.get("megatron_config"):
        # PEFT would import the module that `megatron_core` names: a config must never choose code to run.
        return Refusal("adapter_config.json sets megatron_config", "remove megatron_config/megatron_core")
    if str(raw.get("peft_type", "")).upper() not in ("LORA", ""):
        return Refusal(
            f"peft_type is {raw.get('peft_type')}, not LORA", "give a LoRA adapter (or serve this one with PEFT)"
        )
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        return Refusal(
            f"init_lora_weights is '{init}', so the adapter only fits the base that initialisation modified",
            "re-save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) to convert it to "
            "plain LoRA",
        )
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            return Refusal(f"{what} is not supported", "serve it with PEFT, or retrain as plain LoRA")
    return None


def missing_targets(cfg: Any, model: Any) -> list[str]:
    """Names in the adapter's target_modules list that match no module of the base (PEFT matches name suffixes).

    PEFT only fails when nothing matches; a partial match would silently drop what the adapter meant for the rest.
    A regex string is PEFT's to match; the tensor check still catches what it leaves out.
    """
    targets = cfg.target_modules
    if not isinstance(targets, (list, set)):
        return []
    names = [name for name, _ in model.named_modules()]
    return sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))


def kinds(cfg: Any) -> list[str]:
    """The settings of this adapter that the merge handles beyond plain s * B @ A, for /info."""
    flags = {
        "rslora": cfg.use_rslora,
        "dora": cfg.use_dora,
        "lora_bias": cfg.lora_bias,
        "fan_in_fan_out": cfg.fan_in_fan_out,
        "rank_pattern": bool(cfg.rank_pattern),
        "alpha_pattern": bool(cfg.alpha_pattern),
        "layers_to_transform": cfg.layers_to_transform is not None,
        "modules_to_save": bool(cfg.modules_to_save),
    }
    return [name for name, on in flags.items() if on]


def adapter_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside the adapter (added tokens, chat template), if it ships one."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def quantization_method(model_path: Path) -> str | None:
    """quant_method from a model folder's config.json (GPTQ, AWQ, bitsandbytes, ...), or None."""
    config = model_path / "config.json"
    if model_path.suffix == ".gguf" or not config.is_file():
        return None  # transformers dequantizes GGUF to a float dtype on load
    quant = json.loads(config.read_text()).get("quantization_config")
    if not quant:
        return None
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else "unknown"


def resize_vocab(base: Any, vocab: int) -> bool:
    """Grow the base's embeddings to the adapter tokenizer's size; the new rows are NaN until an adapter fills them.

    NaN rather than transformers' random init: a row the adapter does not ship then shows up in `unfilled_rows`
    instead of serving an untrained embedding for the added token.
    """
    old = base.get_input_embeddings().num_embeddings
    if vocab <= old:
        return False
    base.resize_token_embeddings(vocab, mean_resizing=False)
    for module in {id(m): m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m}.values():
        module.weight.data[old:] = float("nan")
    return True


def unfilled_rows(served: list[tuple[str, Any]]) -> str | None:
    """The first served embedding (name, module) that still holds a NaN row after the adapters loaded."""
    for name, module in served:
        if module is not None and module.weight.isnan().any():
            return name
    return None
