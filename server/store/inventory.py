"""What a base model's and an adapter's files hold, read from their headers: every tensor's shape and stored dtype,
without reading a weight.

- safetensors: the JSON header at the front of each file (`safe_open` maps the file and parses only the header);
  sharded checkpoints through their index.
- GGUF: the parameters of the model transformers builds from its metadata, on the meta device (transformers
  dequantizes every tensor to float32).
- pickle `.bin` (only with security.allow_pickle): `torch.load(mmap=True, weights_only=True)` maps the storages
  without reading them.

Used by the boot memory estimate (server.boot.budget), which needs sizes only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from server.config.schema import ModelConfig
from server.store.checkpoint import INDEX_FILE, TensorSpec
from server.store.sources import SourceError

# safetensors' dtype names as safe_open reports them (its header's names are upper case)
_SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")


@dataclass(frozen=True)
class Inventory:
    """The tensors of a set of files, and how they were read."""

    tensors: list[TensorSpec]
    read_from: str

    def numel(self) -> int:
        return sum(numel(t.shape) for t in self.tensors)

    def bytes_as(self, dtype: torch.dtype | None) -> int:
        """Bytes with every floating tensor in `dtype` (None: as stored); other tensors keep theirs."""
        return sum(numel(t.shape) * _cast(t.dtype, dtype).itemsize for t in self.tensors)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _cast(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def safetensors_specs(path: Path) -> list[TensorSpec]:
    try:
        with safe_open(str(path), framework="pt") as f:
            specs = []
            for name in f.keys():  # noqa: SIM118  # a safe_open handle is not a mapping: no `in f`
                part = f.get_slice(name)
                dtype = _SAFETENSORS.get(part.get_dtype())
                if dtype is None:
                    unknown = f"'{path}': tensor '{name}' is {part.get_dtype()}, a dtype not sized here"
                    raise SourceError(unknown, "nothing: serve boots without the memory estimate")
                specs.append(TensorSpec(name, tuple(part.get_shape()), dtype))
    except SafetensorError as exc:  # a header that does not match the file: truncated, or not safetensors
        raise SourceError(f"'{path}' cannot be read: {exc}", "copy or download the file again") from None
    return specs


def _pickle_specs(path: Path) -> list[TensorSpec]:
    try:
        state: Any = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # weights_only refusals are UnpicklingError, corrupt files anything
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"'{path}' cannot be read: {first}", "re-save it") from None
    if not isinstance(state, dict):
        raise SourceError(f"'{path}' is not a dict of tensors", "re-save it as a state dict")
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)]


def _skeleton_specs(config: PretrainedConfig) -> list[TensorSpec]:
    """The parameters transformers builds for `config` (a tied head once), on the meta device: no memory, and for a
    GGUF base no second parse of its metadata (the vocabulary alone is ~50k fields, seconds to read)."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # transformers dequantizes every GGUF tensor to float32
    return [TensorSpec(n, tuple(p.shape), torch.float32) for n, p in skeleton.named_parameters()]


def _folder_specs(folder: Path, allow_pickle: bool) -> Inventory:
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return Inventory([s for name in files for s in safetensors_specs(folder / name)], "safetensors headers")
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return Inventory([s for path in shards for s in safetensors_specs(path)], "safetensors headers")
    pickles = sorted(folder.glob("*.bin"))
    if pickles and allow_pickle:
        return Inventory([s for path in pickles for s in _pickle_specs(path)], "pickle files, memory-mapped")
    raise SourceError(f"'{folder}' holds no safetensors weights", "convert the model to safetensors")


def base_inventory(model: ModelConfig, allow_pickle: bool = False) -> tuple[PretrainedConfig, Inventory]:
    """The base's transformers config and its tensors (a tied head stored beside its embeddings counted once)."""
    local = model.local
    if local.suffix == ".gguf":
        config = AutoConfig.from_pretrained(str(local.parent), gguf_file=local.name, local_files_only=True)
        return config, Inventory(_skeleton_specs(config), "GGUF metadata: the model transformers builds from it")
    config = AutoConfig.from_pretrained(str(local), trust_remote_code=model.trust_remote_code, local_files_only=True)
    found = _folder_specs(local, allow_pickle)
    names = {t.name for t in found.tensors}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in names and len(names) > 1:
        found = Inventory([t for t in found.tensors if t.name != "lm_head.weight"], found.read_from)
    return config, found


def adapter_inventory(folder: Path, allow_pickle: bool = False) -> Inventory:
    """An adapter's saved tensors (adapter_model.safetensors, or .bin where pickle is allowed)."""
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        return Inventory(safetensors_specs(path), "safetensors headers")
    if (folder / "adapter_model.bin").is_file() and allow_pickle:
        return Inventory(_pickle_specs(folder / "adapter_model.bin"), "pickle files, memory-mapped")
    raise SourceError(f"'{folder}' has no adapter_model.safetensors", "save the adapter with safe_serialization")


def adapted_modules(adapter: Inventory) -> dict[str, int]:
    """module -> elements of the base weight it adapts: a LoRA pair A (r, in), B (out, r) adapts an (out, in)
    weight, an embedding pair A (r, rows), B (dim, r) a (rows, dim) table. Read from the pairs' shapes alone, so a
    GGUF base's names need no mapping."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in adapter.tensors:
        for part in _LORA_PARTS:
            if part in t.name:
                module = t.name.split(part)[0]
                side = "A" if part.rstrip(".").endswith("A") else "B"
                pairs.setdefault(module, {})[side] = t.shape
    return {m: p["A"][1] * p["B"][0] for m, p in pairs.items() if "A" in p and "B" in p and len(p["A"]) == 2}
