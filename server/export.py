"""Offline export: `mergeserve merge --config FILE --out DIR` writes the merged model as a standard HF checkpoint.

Memory: the base is never materialised. The model is built on the meta device (shapes only), the small LoRA tensors
are attached to it, and the stored base is read tensor by tensor: each adapted weight is merged in float32 with the
same per-kind delta (`merge_kinds.composed_delta`) the server uses, rounded once to the output dtype, written and
freed. Peak memory is about the largest tensor in float32 plus its rounded copy, not the model.

Numerics versus the server: with the output dtype equal to the stored dtype (or float32), the written weights equal
the server's merged weights bit for bit. When the output dtype is narrower than the stored one, the server rounds
W0 at load time and then rounds the merge again, while the export rounds W0 + delta once: at least as accurate.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.boot import BootError, load_adapters
from server.checkpoint import TensorSpec, write_sharded
from server.config import Config
from server.merge import MergeError, check_mergeable, lora_layers, saved_modules
from server.merge_kinds import composed_delta, uses_bias
from server.model_files import resolve_dtype, tied_names, write_model_files
from server.sources import SourceError, open_source

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[str]
    dtype: torch.dtype
    model_bytes: int
    tie_word_embeddings: bool
    seconds: float
    peak_rss_above_baseline: int | None  # bytes; None where /proc is not available

    @property
    def peak_ratio(self) -> float | None:
        return None if self.peak_rss_above_baseline is None else self.peak_rss_above_baseline / self.model_bytes


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak measured is the export's own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _refuse(message: str) -> BootError:
    return BootError(message.replace(" | ", "; fix: "), EXIT_BAD_INPUT)


def _refuse_unstreamable(config: Config, peft_model: torch.nn.Module, names: list[str]) -> None:
    """What the tensor-by-tensor export does not write yet; the server merges all of it, and so does its cache."""
    problem = None
    if config.combine.method != "linear":
        problem = f"combine.method {config.combine.method} (its deltas need every base weight at once)"
    elif any(True for _ in saved_modules(peft_model, names)):
        problem = "modules_to_save (whole replacement modules)"
    elif any(uses_bias(layer, a) for _, layer in lora_layers(peft_model) for a in names if a in layer.lora_A):
        problem = "lora_bias (changes to the base biases)"
    if problem:
        raise _refuse(f"adapters {names}: export does not stream {problem} yet; fix: serve in merged mode instead")


def export_merged(
    config: Config, out: Path, dtype: str | None = None, max_shard_bytes: int = 200 * 10**6
) -> ExportResult:
    """Stream the merged model into `out` (which must not exist or be empty); raises BootError as boot does."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _refuse(f"--out '{out}' exists and is not an empty folder | give a new folder")
    start = time.perf_counter()
    _reset_peak_rss()
    baseline_kb = _proc_status_kb("VmRSS")
    try:
        source = open_source(config.model.path, config.model.trust_remote_code)
    except SourceError as exc:
        raise _refuse(f"base model '{config.model.path}': {exc}") from None
    out_dtype = resolve_dtype(dtype or config.model.dtype, source.config, source.specs())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(source.config, trust_remote_code=config.model.trust_remote_code)
    embed_name, head_name = tied_names(skeleton)
    peft_model, _ = load_adapters(
        skeleton, config.adapters, on_meta_base=True, allow_pickle=config.security.allow_pickle
    )
    names = [a.name for a in config.adapters]
    try:
        check_mergeable(peft_model, names)
    except MergeError as exc:
        raise BootError(f"merge check failed: {exc}".replace(" | ", "; fix: "), 3) from None
    _refuse_unstreamable(config, peft_model, names)
    adapted = {name.removeprefix("base_model.model.") + ".weight": layer for name, layer in lora_layers(peft_model)}
    tie = bool(getattr(source.config, "tie_word_embeddings", False))
    specs = source.specs()
    stored = {s.name for s in specs}
    if tie and head_name and embed_name and head_name not in stored and (embed_name in adapted or head_name in adapted):
        # A LoRA on one side of tied embeddings: the two matrices differ after the merge, so both are written and the
        # config unties them; otherwise the loader would re-tie and one side would overwrite the other.
        tie = False
        specs.append(next(TensorSpec(head_name, s.shape, s.dtype) for s in specs if s.name == embed_name))
    out_specs = [TensorSpec(s.name, s.shape, out_dtype if s.dtype.is_floating_point else s.dtype) for s in specs]

    def produce(spec: TensorSpec) -> torch.Tensor:
        untied_head = spec.name == head_name and spec.name not in stored and embed_name is not None
        weight = source.get(embed_name if untied_head and embed_name else spec.name)
        layer = adapted.get(spec.name)
        if layer is not None:
            # W0 comes from the source, not the (meta) skeleton: DoRA's column norms are taken of W0 + delta.
            weight = weight.float() + composed_delta(layer, names, weight).weight
        return weight.to(spec.dtype)

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        # The small files first: building a tokenizer from a GGUF takes memory that is freed before the weights start.
        files = write_model_files(partial, config.model, source.config, out_dtype, tie)
        gc.collect()
        files += write_sharded(partial, out_specs, produce, max_shard_bytes)
        if out.exists():
            out.rmdir()
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    peak_kb = _proc_status_kb("VmHWM")
    above = None if peak_kb is None or baseline_kb is None else (peak_kb - baseline_kb) * 1024
    return ExportResult(
        out=out,
        files=sorted(files),
        dtype=out_dtype,
        model_bytes=sum(s.nbytes for s in out_specs),
        tie_word_embeddings=tie,
        seconds=time.perf_counter() - start,
        peak_rss_above_baseline=above,
    )
