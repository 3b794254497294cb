"""Reading a base model's weights one tensor at a time, from a Hugging Face folder or a GGUF file.

`from_pretrained` materialises the whole model; the offline export only needs one tensor at a time, so it reads the
stored files directly: safetensors through `safe_open` (memory-mapped), GGUF through gguf-py's memory-mapped reader,
dequantized tensor by tensor with transformers' own name map and per-architecture fix-ups (the Llama q/k row
permutation), which gives bit-identical values to transformers' GGUF loader.
Pickle `.bin` checkpoints are refused: loading them runs code.
"""

from __future__ import annotations

import gc
import json
import mmap
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from server.errors import MergeserveError
from server.store.checkpoint import TensorSpec

# Tensors are dequantized in slices of this many rows, so gguf-py's temporaries stay small for big embeddings.
GGUF_ROWS_PER_SLICE = 4096


class SourceError(MergeserveError):
    """The stored base cannot be read tensor by tensor."""


class TensorSource(Protocol):
    config: PretrainedConfig

    def specs(self) -> list[TensorSpec]: ...

    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsSource:
    def __init__(self, folder: Path, trust_remote_code: bool = False) -> None:
        self.config = AutoConfig.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, local_files_only=True
        )
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise SourceError(f"'{folder}' has no model.safetensors", "convert the base to safetensors")
        # Read with plain file reads, not safe_open: its memory map would leave every touched page of the stored
        # model in our resident set until the end, which is the full model size for a float32 base.
        self.where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, byte offset, byte length)
        self._specs: list[TensorSpec] = []
        for file_name in files:
            path = folder / file_name
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                self._specs.append(TensorSpec(name, tuple(meta["shape"]), _SAFETENSORS_TO_TORCH[meta["dtype"]]))
                self.where[name] = (path, 8 + header_len + begin, end - begin)
        self.shapes = {s.name: s for s in self._specs}

    def specs(self) -> list[TensorSpec]:
        return list(self._specs)

    def get(self, name: str) -> torch.Tensor:
        path, offset, length = self.where[name]
        spec = self.shapes[name]
        raw = torch.empty(length, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(raw.numpy().data) != length:
                raise SourceError(f"'{path}' ends inside tensor '{name}'", "re-download the base")
        return raw.view(spec.dtype).reshape(spec.shape)


_SAFETENSORS_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                         "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                         "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


class GGUFSource:
    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only
        arch = parsed["config"]["model_type"]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        self.name_map: dict[str, str] = get_gguf_hf_weights_map(skeleton, self.processor)
        self.reader = GGUFReader(str(path))
        self.tensors: dict[str, Any] = {}
        self._specs = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        for t in self.reader.tensors:
            hf_name = self.name_map.get(t.name)
            if hf_name is None:
                continue  # e.g. rope frequency tables that transformers recomputes
            self.tensors[hf_name] = t
            # GGUF lists dimensions fastest-first; numpy/torch order is the reverse.
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.shapes[hf_name] = shape
            self._specs.append(TensorSpec(hf_name, shape, torch.float32))
        # The metadata fields (the whole vocabulary as numpy views) weigh ~100 MB for a 49k vocabulary; the config
        # was built from them already, and only the tensors are read from here on.
        self.reader.fields.clear()
        gc.collect()

    def specs(self) -> list[TensorSpec]:
        return list(self._specs)

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self.tensors[name]
        spec_shape = self.shapes[name]
        out = np.empty(spec_shape, dtype=np.float32)
        rows = t.data.shape[0] if t.data.ndim > 1 else None
        if rows is None or len(spec_shape) != 2:
            out[...] = dequantize(t.data, t.tensor_type).reshape(spec_shape)
        else:
            for start in range(0, rows, GGUF_ROWS_PER_SLICE):
                stop = min(start + GGUF_ROWS_PER_SLICE, rows)
                out[start:stop] = dequantize(t.data[start:stop], t.tensor_type)
        result = self.processor.process(
            weights=out, name=t.name, tensor_key_mapping=self.name_map, parsed_parameters={}
        )
        # Drop the file pages this tensor touched from our resident set (they stay in the page cache): otherwise the
        # whole mapped GGUF counts toward the export's peak memory by the end.
        mapping = getattr(self.reader.data, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)
        return torch.from_numpy(np.ascontiguousarray(result.weights))


def open_source(path: Path, trust_remote_code: bool = False) -> TensorSource:
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
        raise SourceError(f"'{path}' holds pickle .bin weights only", "convert the base to safetensors")
    return SafetensorsSource(path, trust_remote_code)
