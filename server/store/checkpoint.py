"""Writing a standard Hugging Face checkpoint one tensor at a time: sharded safetensors, index, configs, tokenizer.

Used by the offline export (`mergeserve merge`) and by the merge cache. The shard layout is planned from shapes
alone, then each shard's safetensors header is written first and every tensor's bytes are appended as soon as the
tensor is produced. So the writer never holds more than the one tensor it is writing, whatever the shard size;
`safetensors.torch.save_file` would need a whole shard in memory at once.

The file format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}} padded with spaces to a multiple of 8, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.errors import MergeserveError

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_FILE = "model.safetensors.index.json"
# What a tokenizer may consist of on disk; copied byte for byte when the base is a Hugging Face folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'200MB' -> 200_000_000; '1GiB' -> 2**30; a bare number is bytes."""
    m = _SIZE.match(text)
    if not m:
        raise MergeserveError(f"cannot read size '{text}'", "write it like 200MB or 2GB", "--max-shard-size")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in the given order: a new shard starts when the next tensor would overflow the current one."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


@dataclass(frozen=True)
class Written:
    """One tensor's bytes are out: its shard (1-based, of `shards`) and whether it was the shard's last tensor."""

    shard: int
    shards: int
    file: str
    nbytes: int
    shard_bytes: int
    last: bool


def write_sharded(
    out: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    max_shard_bytes: int,
    progress: Callable[[Written], None] | None = None,
) -> list[str]:
    """Write `specs` into model-0000i-of-0000n.safetensors plus the index; `produce` makes each tensor on demand.

    Each produced tensor must have exactly the planned shape and dtype; it is dropped right after its bytes are out,
    and then `progress` hears of it. Returns the written file names.
    """
    shards = plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for number, (file_name, shard) in enumerate(zip(names, shards, strict=True), start=1):
        header = _header(shard)
        shard_bytes = sum(s.nbytes for s in shard)
        with open(out / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for i, spec in enumerate(shard):
                tensor = produce(spec)
                if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                    raise RuntimeError(f"{spec.name}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {spec}")
                flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                f.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
                weight_map[spec.name] = file_name
                del tensor, flat
                if progress is not None:
                    progress(Written(number, len(shards), file_name, spec.nbytes, shard_bytes, i == len(shard) - 1))
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


def copy_tokenizer_files(source_dir: Path, out: Path) -> list[str]:
    """Byte-for-byte copies of the tokenizer and chat-template files a Hugging Face folder holds."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)
            copied.append(name)
    return copied


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_under(folder: Path) -> Iterable[Path]:
    """Every regular file below `folder`, sorted, skipping hidden names (.git, .cache of hub downloads)."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield path
