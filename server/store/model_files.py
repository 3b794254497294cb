"""The non-weight files of a checkpoint: config.json, generation_config.json and the tokenizer.

Shared by the offline export and the merge cache, so both write the same kind of folder: one that
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load with no adapter files.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from server.config.schema import ModelConfig
from server.store.checkpoint import TensorSpec, copy_tokenizer_files


def resolve_dtype(dtype: str, hf_config: PretrainedConfig, specs: list[TensorSpec]) -> torch.dtype:
    """A configured dtype, or the checkpoint's own for `checkpoint` and `auto`: config.json's dtype, else its first
    float tensor's. (Serving measures `auto` on its device; an offline export has no device to measure, and keeping
    the stored dtype neither rounds nor widens the weights.)"""
    if dtype not in ("auto", "checkpoint"):
        return cast(torch.dtype, getattr(torch, dtype))
    declared: Any = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(declared, str) and isinstance(getattr(torch, declared, None), torch.dtype):
        declared = getattr(torch, declared)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    return next((s.dtype for s in specs if s.dtype.is_floating_point), torch.float32)


def tied_names(model: nn.Module) -> tuple[str | None, str | None]:
    """Parameter names of the input embeddings and the output head (the pair `tie_word_embeddings` ties)."""
    found: dict[str, str | None] = {"in": None, "out": None}
    getter: Any = getattr(model, "get_input_embeddings", None)
    inputs = getter() if callable(getter) else None
    getter = getattr(model, "get_output_embeddings", None)
    outputs = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if module is inputs and found["in"] is None:
            found["in"] = f"{name}.weight"
        if module is outputs and found["out"] is None:
            found["out"] = f"{name}.weight"
    return found["in"], found["out"]


def causal_lm_architectures(hf_config: PretrainedConfig) -> list[str]:
    """config.json's `architectures`: the class AutoModelForCausalLM builds for this config, the one we merged in.

    A GGUF's config has none, and loaders that pick the class by name (`transformers serve`, vLLM) fail without it.
    A remote-code model type is not in transformers' table; its own config names its class.
    """
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", ""))
    return [name] if isinstance(name, str) else list(getattr(hf_config, "architectures", None) or [])


def write_model_files(
    out: Path,
    model_cfg: ModelConfig,
    hf_config: PretrainedConfig,
    dtype: torch.dtype,
    tie: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[str]:
    """config.json, generation_config.json and tokenizer files for the merged weights already in `out`."""
    cfg = copy.deepcopy(hf_config)
    cfg.dtype = dtype
    cfg.tie_word_embeddings = tie
    cfg.save_pretrained(out)
    # Keys starting with "_" are transformers' private attributes (a GGUF's `_model_name_or_path`), not config.
    raw = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if not k.startswith("_")}
    raw["architectures"] = causal_lm_architectures(hf_config)
    if (raw.get("quantization_config") or {}).get("quant_method") == "gguf":
        # transformers records the GGUF it dequantized; the tensors written here are dense, and vLLM refuses the
        # folder ("Unknown quantization method: gguf") while the key is there.
        del raw["quantization_config"]
    # transformers 5 writes `dtype`; older loaders (and vLLM's config readers) look for `torch_dtype`.
    raw["torch_dtype"] = raw["dtype"] = str(dtype).removeprefix("torch.")
    raw["tie_word_embeddings"] = tie
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    written = ["config.json", "generation_config.json"]
    base = model_cfg.local
    if base.is_dir() and (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    if tokenizer is None and base.is_dir():
        return written + copy_tokenizer_files(base, out)
    if tokenizer is None:
        # A GGUF file has no tokenizer files to copy: the tokenizer the server builds from it is saved once.
        tokenizer = AutoTokenizer.from_pretrained(str(base.parent), gguf_file=base.name, local_files_only=True)
    # A given tokenizer is the one served, which is the adapter's own when it ships one (added tokens, another chat
    # template): the base folder's files would give a reloaded checkpoint fewer tokens than its embedding has rows.
    before = {p.name for p in out.iterdir()}
    tokenizer.save_pretrained(out)
    return written + sorted({p.name for p in out.iterdir()} - before)
