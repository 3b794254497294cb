"""Offline export: `mergeserve merge --config FILE --out DIR` writes the merged model as a standard HF checkpoint.

Memory: the base is never materialised. The model is built on the meta device (shapes only), the small adapter
tensors are attached to it, and the stored base is read tensor by tensor: each adapted weight is merged in float32
with the same per-kind delta the server uses (`merge.layer_delta`), rounded once to the output dtype, written and
freed. Peak memory is about the largest tensor in float32 plus its rounded copy, not the model. Every kind merged
serving merges streams this way:

- lora_bias: a layer's bias moves with its weight's delta (DoRA rescales it), so the bias is written right after its
  weight, from the delta computed for the weight; only the small bias delta waits in between.
- modules_to_save: the replacement modules come with the adapter and are already in memory (the adapter's size);
  their tensors are written in place of the base's.
- TIES/DARE (`combine`): each layer's mix needs only that layer's per-adapter deltas, so it streams too, at a
  higher peak: with n adapters on the largest adapted tensor, their n float32 deltas, the n trimmed or dropped
  copies, the stack of those and the agreeing entries, roughly 4n float32 copies of that one tensor (one layer at
  a time; merged serving's `merge.plan` holds every layer's combined delta at once). DARE draws from one generator
  in module order while the file order differs; the draws are replayed once up front (shapes only, one tensor's
  worth of random numbers at a time) to record the generator state at each layer's turn, so the same seed drops
  the same entries as merged serving.

What is written is what the server serves, beyond the weights too:

- The tokenizer and chat template are the adapters' own when one ships them (`load.adapters.shipped_tokenizer`,
  as boot chooses), else the base's. Added tokens grow the skeleton's embeddings as boot grows the base's; PEFT
  loads the embedding matrix saved with the adapter into the skeleton, and that matrix is W0 for those rows and the
  rest. A grown matrix no adapter ships rows for is refused, as boot refuses it.
- Tied embeddings an adapter changes on either side are written untied, the head made from the embedding (the
  loader reads a tied head from the embedding even where the file stores `lm_head.weight`, and the server's
  untie clones it from there).

The export also writes `mergeserve.json` (`write_record`): the base's and each adapter's path, or Hub id with the commit
it resolved to, the weights, the combine method and the dtype, so a checkpoint names exactly what went into it.

Numerics versus the server: with the output dtype equal to the stored dtype (or float32), the written weights equal
the server's merged weights bit for bit. When the output dtype is narrower than the stored one, the server rounds
W0 at load time and then rounds the merge again, while the export rounds W0 + delta once: at least as accurate.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from server import __version__
from server.config.schema import AdapterConfig, Config, ModelConfig
from server.errors import ExitCode
from server.load.adapters import BootError, load_adapters, merge_refusal, shipped_tokenizer
from server.load.policy import resize_vocab
from server.merge.apply import MergeError, check_mergeable, layer_delta, lora_layers, saved_modules
from server.merge.combine import MixSpec, skip_draws
from server.merge.kinds import LayerDelta, has_adapter, uses_bias
from server.rss import reset_peak_rss, status_kib
from server.store.checkpoint import TensorSpec, write_sharded
from server.store.hub import resolve_hub
from server.store.model_files import resolve_dtype, tied_names, write_model_files
from server.store.progress import ShardProgress
from server.store.sources import SourceError, TensorSource, open_source

EXPORT_RECORD = "mergeserve.json"


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


def write_record(out: Path, config: Config, dtype: torch.dtype) -> str:
    """mergeserve.json: what was merged, from where (a Hub id with the commit it resolved to) and how."""

    def source(item: ModelConfig | AdapterConfig) -> dict[str, Any]:
        hub = item.hub
        where = {"path": str(item.local)} if hub is None else {"hub_id": str(hub), "commit": hub.sha}
        return where | ({"subfolder": item.subfolder} if item.subfolder else {})

    record = {
        "mergeserve": __version__,
        "base": source(config.model),
        "adapters": [{"name": a.name, "weight": a.weight, **source(a)} for a in config.adapters],
        "combine": config.combine.model_dump(),
        "dtype": str(dtype).removeprefix("torch."),
    }
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return EXPORT_RECORD


def _prefixless(name: str) -> str:
    return name.removeprefix("base_model.model.")


def generator_states(peft_model: nn.Module, names: list[str], spec: MixSpec) -> dict[str, torch.Tensor]:
    """DARE's generator state at each layer's turn, replaying the draws `merge.plan` makes in module order."""
    generator = spec.generator()
    states: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(peft_model):
        states[_prefixless(name)] = generator.get_state()
        present = [a for a in names if has_adapter(layer, a)]
        base = layer.get_base_layer()
        skip_draws(cast(torch.Tensor, base.weight).shape, len(present), spec, generator)
        biased = [a for a in present if uses_bias(layer, a)]
        if biased:
            skip_draws(cast(torch.Tensor, base.bias).shape, len(biased), spec, generator)
    return states


@dataclass
class _Deltas:
    """Each adapted module's float32 delta, made when its weight is written, from W0 read out of the base files."""

    source: TensorSource
    names: list[str]
    spec: MixSpec
    layers: dict[str, LoraLayer]  # module name -> LoRA layer
    states: dict[str, torch.Tensor]  # module name -> DARE generator state at its turn
    pending_bias: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> bias delta to write next

    def weight(self, module: str, w0: torch.Tensor) -> torch.Tensor:
        generator = None
        if module in self.states:
            generator = torch.Generator().set_state(self.states[module])
        delta: LayerDelta = layer_delta(self.layers[module], self.names, self.spec, generator, w0=w0)
        if delta.bias is not None:
            self.pending_bias[module] = delta.bias
        return delta.weight

    def bias(self, module: str) -> torch.Tensor | None:
        if module not in self.pending_bias:  # never, as long as each bias is planned right after its weight
            self.weight(module, self.source.get(f"{module}.weight"))
        return self.pending_bias.pop(module, None)


def _bias_after_weight(specs: list[TensorSpec], biased: set[str]) -> list[TensorSpec]:
    """The file order, but each adapted bias right after its weight: its delta comes out of the weight's."""
    moved = {f"{m}.bias" for m in biased}
    out: list[TensorSpec] = []
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if spec.name in moved:
            continue
        out.append(spec)
        module = spec.name.removesuffix(".weight")
        if module in biased and f"{module}.bias" in by_name:
            out.append(by_name[f"{module}.bias"])
    return out


def _saved_tensors(peft_model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensor name -> the modules_to_save copy's tensor that replaces the base's."""
    saved = {}
    for name, wrapper, adapter in saved_modules(peft_model, names):
        module = cast(nn.Module, wrapper.modules_to_save[adapter])
        for key, value in module.state_dict().items():
            saved[f"{_prefixless(name)}.{key}"] = value
    return saved


@dataclass
class _Plan:
    """What to write and how to make each tensor of it."""

    source: TensorSource
    specs: list[TensorSpec]  # output layout, in write order
    tie: bool
    saved: dict[str, torch.Tensor]  # tensor name -> modules_to_save replacement
    shipped: dict[str, torch.Tensor]  # tensor name -> base matrix an adapter ships (embedding layers saved with it)
    deltas: _Deltas
    biased: set[str]  # modules whose bias an adapter moves (lora_bias)
    embed_name: str | None
    head_from_embed: str | None  # the head of tied embeddings: the loader (so the server) reads it from the embedding

    def base(self, name: str) -> torch.Tensor:
        """W0 as the server holds it: a shipped matrix replaces the stored one (PEFT loads it into the base)."""
        if name == self.head_from_embed and self.embed_name:
            name = self.embed_name
        return self.shipped[name] if name in self.shipped else self.source.get(name)

    def produce(self, spec: TensorSpec) -> torch.Tensor:
        if spec.name in self.saved:
            return self.saved[spec.name].to(spec.dtype)
        weight = self.base(spec.name)
        module, _, leaf = spec.name.rpartition(".")
        if leaf == "weight" and module in self.deltas.layers:
            # W0 comes from the source, not the (meta) skeleton: DoRA's column norms are taken of W0 + delta.
            weight = weight.float() + self.deltas.weight(module, weight)
        elif leaf == "bias" and module in self.biased and (bias := self.deltas.bias(module)) is not None:
            weight = weight.float() + bias
        return weight.to(spec.dtype)


@dataclass(frozen=True)
class _Attached:
    skeleton: nn.Module  # on the meta device, grown to the shipped tokenizer's vocabulary
    peft_model: nn.Module  # on the skeleton, with every adapter's own tensors
    names: list[str]
    tokenizer: PreTrainedTokenizerBase | None  # the adapters' own, which the server serves; None: the base's
    vocab: int | None  # the rows the embeddings grew to for that tokenizer's added tokens; None: not grown


def _attach(config: Config, source: TensorSource) -> _Attached:
    """The PEFT model on a meta skeleton, as boot builds it on the real base; refuses what boot refuses."""
    tokenizer = shipped_tokenizer(config.adapters)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(source.config, trust_remote_code=config.model.trust_remote_code)
        # As boot.arms.serving_tokenizer does: added tokens grow the embeddings; their rows ship with the adapter.
        grown = tokenizer is not None and resize_vocab(skeleton, len(tokenizer))
    peft_model, _ = load_adapters(
        skeleton, config.adapters, on_meta_base=True, allow_pickle=config.security.allow_pickle
    )
    names = [a.name for a in config.adapters]
    try:
        check_mergeable(peft_model, names)
    except MergeError as exc:
        raise merge_refusal(exc, ExitCode.CHECK_FAILED, "merge check failed") from None
    return _Attached(skeleton, peft_model, names, tokenizer, len(tokenizer) if grown and tokenizer else None)


def _shipped(peft_model: nn.Module, stored: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Base matrices the adapters put into the skeleton (PEFT loads saved embedding layers into the base layer), in
    the stored dtype: the server loads them into a base of that dtype, rounding them once before the merge."""
    out = {}
    for name, param in cast(Any, peft_model).get_base_model().named_parameters():
        if param.device.type != "meta" and ".lora_" not in name and ".modules_to_save." not in name:
            plain = name.replace(".base_layer.", ".")
            out[plain] = param.detach().to(stored.get(plain, param.dtype))
    return out


def _grow(
    specs: list[TensorSpec], vocab: int | None, grown: set[str], plan: _Plan, names: list[str]
) -> list[TensorSpec]:
    """Specs with the `grown` embeddings at `vocab` rows; refuses (as boot does) one no adapter ships the rows of."""
    if vocab is None:
        return specs
    out = []
    for s in specs:
        if s.name in grown and s.shape[0] < vocab:
            source = plan.embed_name if s.name == plan.head_from_embed else s.name
            if s.name not in plan.saved and source not in plan.shipped:
                listed = ", ".join(repr(n) for n in names)
                raise BootError(
                    f"the adapter tokenizer adds tokens, but no adapter ships their rows of '{s.name}'",
                    "save the adapter with save_embedding_layers=True or modules_to_save",
                    f"adapters {listed}",
                )
            s = TensorSpec(s.name, (vocab, *s.shape[1:]), s.dtype)
        out.append(s)
    return out


def _plan(config: Config, source: TensorSource, out_dtype: torch.dtype) -> tuple[_Plan, _Attached]:
    attached = _attach(config, source)
    peft_model, names = attached.peft_model, attached.names
    embed_name, head_name = tied_names(attached.skeleton)
    spec = MixSpec(config.combine.method, config.combine.density or 1.0, config.combine.seed)
    layers = {_prefixless(name): layer for name, layer in lora_layers(peft_model)}
    biased = {m for m, layer in layers.items() if any(uses_bias(layer, a) for a in names)}
    tie = bool(getattr(source.config, "tie_word_embeddings", False))
    specs = source.specs()
    stored = {s.name: s.dtype for s in specs}
    plan = _Plan(
        source=source, specs=[], tie=tie, saved=_saved_tensors(peft_model, names), shipped=_shipped(peft_model, stored),
        deltas=_Deltas(source, names, spec, layers, {}), biased=biased, embed_name=embed_name,
        head_from_embed=head_name if tie else None,
    )  # fmt: skip
    touched = {f"{m}.weight" for m in layers} | set(plan.saved)
    if tie and head_name and embed_name and {embed_name, head_name} & touched:
        # An adapter changes one side of tied embeddings: the two matrices differ after the merge, so both are written
        # and the config unties them; otherwise the loader would re-tie and one side would overwrite the other. A head
        # stored beside tied embeddings is not what the server reads either (the loader ties it to the embedding), so
        # the untied head is always made from the embedding, as the server's untie clones it.
        plan.tie = False
        if head_name not in stored:
            specs.append(next(TensorSpec(head_name, s.shape, s.dtype) for s in specs if s.name == embed_name))
    grown = {n for n in (embed_name, head_name) if n}
    specs = _bias_after_weight(_grow(specs, attached.vocab, grown, plan, names), biased)
    plan.specs = [TensorSpec(s.name, s.shape, out_dtype if s.dtype.is_floating_point else s.dtype) for s in specs]
    if spec.method.startswith("dare"):
        plan.deltas.states.update(generator_states(peft_model, names, spec))
    return plan, attached


def _staging(out: Path) -> Path:
    """A fresh folder to write the export into before it appears at `out`. Beside `out` when `out` does not exist (one
    rename then publishes it). Inside `out` when it is an (empty) folder, which may be a mount point: a rename from
    the parent's filesystem onto it fails with EXDEV and removing it with EBUSY, while renames within it always work.
    """
    if out.is_dir():
        for left in [p for p in out.iterdir() if _is_staging(p, out)]:  # a killed export's, else --out was refused
            shutil.rmtree(left, ignore_errors=True)
    partial = (out if out.is_dir() else out.parent) / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _is_staging(path: Path, out: Path) -> bool:
    return path.name.startswith(f".{out.name}.partial-") and path.is_dir()


def _publish(partial: Path, out: Path) -> None:
    """Move the complete export from `partial` to `out`, the record last, so a folder holding mergeserve.json holds
    everything. A failure here keeps the finished export where it is and says so: it took the whole merge to make."""
    try:
        if partial.parent != out:
            os.rename(partial, out)
            return
        names = sorted(p.name for p in partial.iterdir())
        for name in sorted(names, key=lambda n: n == EXPORT_RECORD):
            os.rename(partial / name, out / name)
        partial.rmdir()
    except OSError as exc:
        raise BootError(
            f"the export is complete in '{partial}' but could not be moved to '{out}' ({exc})",
            f"move the files of '{partial}' to '{out}'",
        ) from None


def export_merged(
    config: Config, out: Path, dtype: str | None = None, max_shard_bytes: int = 200 * 10**6
) -> ExportResult:
    """Stream the merged model into `out` (which must not exist or be empty); raises BootError as boot does."""
    if out.exists() and (not out.is_dir() or any(not _is_staging(p, out) for p in out.iterdir())):
        raise BootError(f"--out '{out}' exists and is not an empty folder", "give a new folder")
    start = time.perf_counter()
    config = resolve_hub(config)  # Hub ids to snapshot folders; a config without one comes back as it is
    reset_peak_rss()
    baseline_kb = status_kib("VmRSS")
    try:
        source = open_source(config.model.local, config.model.trust_remote_code)
    except SourceError as exc:
        raise BootError(exc.problem, exc.fix, f"base model '{config.model.local}'") from None
    out_dtype = resolve_dtype(dtype or config.model.dtype, source.config, source.specs())
    plan, attached = _plan(config, source, out_dtype)
    hf_config = copy.deepcopy(source.config)
    if attached.vocab is not None:
        hf_config.vocab_size = attached.vocab
    partial = _staging(out)
    try:
        # The small files first: building a tokenizer from a GGUF takes memory that is freed before the weights start.
        files = write_model_files(partial, config.model, hf_config, out_dtype, plan.tie, attached.tokenizer)
        gc.collect()
        with ShardProgress(sum(s.nbytes for s in plan.specs)) as progress:
            files += write_sharded(partial, plan.specs, plan.produce, max_shard_bytes, progress)
        files.append(write_record(partial, config, out_dtype))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _publish(partial, out)
    peak_kb = status_kib("VmHWM")
    above = None if peak_kb is None or baseline_kb is None else (peak_kb - baseline_kb) * 1024
    return ExportResult(
        out=out,
        files=sorted(files),
        dtype=out_dtype,
        model_bytes=sum(s.nbytes for s in plan.specs),
        tie_word_embeddings=plan.tie,
        seconds=time.perf_counter() - start,
        peak_rss_above_baseline=above,
    )
