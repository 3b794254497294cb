"""A base model kept in the merge cache as safetensors: made once at the first boot that needs it, read by later ones.

A GGUF base (the demo's) is dequantized by transformers in Python, tensor by tensor: ~25 s for SmolLM2-135M on 2
cores, at every boot that loads the base (unmerged and ab modes; merged mode reads its merged entry instead). The
same weights as safetensors load in about a second. vLLM 0.32 cannot read a GGUF on the CPU at all, so its unmerged
arm needs the copy too; both engines use the one entry. It is keyed by the base file's digest, the dtype and the
versions of the libraries that make it (`library_versions`: transformers and gguf dequantize, tokenizers converts the
tokenizer), so an upgrade makes a new copy instead of serving the old dequantizer's output.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

from server.boot.phases import PhaseTimer, log
from server.config.schema import Config, ModelConfig
from server.load.adapters import load_base
from server.store.cache import FileHashes, MergeCache, library_versions, tree_digests

BASE_FORMAT = 1


def base_entry(config: Config, cache: MergeCache, timer: PhaseTimer, create: bool = True) -> Path | None:
    """The cache entry holding `config.model` as safetensors in `config.model.dtype` (a concrete dtype, not auto),
    stored under the phase `base_store` when it is not there yet or fails its file check; with `create` false, None
    instead of storing it."""
    identity = {
        "format": BASE_FORMAT,
        "base": tree_digests(config.model.local, FileHashes(cache.root)),
        "dtype": config.model.dtype,
        "libraries": library_versions(("transformers", "gguf", "tokenizers")),
    }
    key = "base-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:26]
    with cache.lock(key):
        manifest, problem = cache.check(key)
        if manifest is None:
            if not create:
                return None
            with timer.phase("base_store"):
                if problem is not None:
                    cache.discard(key)
                tokenizer, base = load_base(config.model, config.security.allow_pickle)
                record: dict[str, Any] = {"inputs": identity, "probes": [], "parity_at_build": None}
                cache.store(key, config, base, tokenizer, {}, record)
                del base
                gc.collect()
    return cache.entry(key)


def vllm_base(config: Config, cache: MergeCache, timer: PhaseTimer) -> Path:
    """A safetensors folder vLLM can load the base from: the model folder itself, or the stored copy."""
    path = config.model.local
    if path.is_dir() and any(path.glob("*.safetensors")):
        return path
    entry = base_entry(config, cache, timer)
    assert entry is not None  # created when missing
    return entry


def torch_base(config: Config, model: ModelConfig, timer: PhaseTimer) -> tuple[ModelConfig, Path | None]:
    """`model` (its dtype resolved) pointed at the stored copy of a GGUF base, and the copy's entry; else `model` as
    it is and None. The modes that load the base at every boot (unmerged, ab) store the copy when it is missing;
    merged mode reads its merged entry at later boots, so its cache misses only read a copy that is already there
    (one an unmerged or ab boot, or the vLLM engine, stored). Only a GGUF: a pickle checkpoint stays behind
    `security.allow_pickle` at every boot. A cache folder that cannot be used costs the copy, not the boot."""
    if model.local.suffix != ".gguf" or not config.cache.enabled:
        return model, None
    try:
        cache = MergeCache(config.cache.resolved_dir())
        cache.sweep()  # a killed base_store leaves a tmp-base-* folder of the base's size
        entry = base_entry(config.model_copy(update={"model": model}), cache, timer, create=config.mode != "merged")
    except OSError as exc:
        log.warning("merge cache: cannot keep the dequantized base there (%s); reading the GGUF", exc)
        return model, None
    if entry is None:
        return model, None
    log.info("base: the dequantized copy of %s in the merge cache (%s)", model.local.name, entry)
    return model.model_copy(update={"path": entry, "revision": None, "subfolder": None}), entry
