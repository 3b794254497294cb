"""The merge cache: merged checkpoints on disk, keyed by a content hash of everything that determines them.

Layout under the cache folder:
    entries/<key>/        a standard HF checkpoint (written by server.checkpoint) plus mergeserve-probes.safetensors
                          and mergeserve-manifest.json, written last, holding the sha256 of every other file
    locks/<key>.lock      held while an entry is looked up, built and stored, so replicas booting together merge once
    file-hashes.json      path -> (stamp, sha256) of inputs and entry files, so unchanged files are not re-hashed
    tmp-*/ trash-*/       entries being written (renamed into entries/ when complete) or being deleted

The key covers the config's part, `Config.merge_identity()` (adapter weights and order, the dtype as resolved: `auto`
is keyed as the dtype this machine picked, the combine method with its density and seed, the parity probes), with
the sha256 of every base and adapter file in place of their paths, plus what lives here: the merge method,
MERGE_FORMAT_VERSION and the versions of the libraries that derive an entry's bytes (`DERIVING_LIBRARIES`: PEFT's
scaling rules; transformers and gguf dequantize a GGUF base; tokenizers converts its tokenizer into the entry's
tokenizer files). Keying on an adapter's name alone goes stale.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from server.config.schema import Config
from server.store.checkpoint import TensorSpec, files_under, sha256_file, write_sharded
from server.store.model_files import tied_names, write_model_files

# Bump when the merge math or the entry layout changes: old entries then simply stop matching.
# 2: per-kind deltas (DoRA, biases, saved modules, untied embeddings) and the combine method joined the key.
# 3: a GGUF base's quantization_config is not written into the (dense) entry: vLLM refuses it.
# 4: the probes file holds the unmerged model's float32 logits (`float32.<i>`, half precision) that a hit is gated
#    against, and every stored logit comes from one batched forward over the probes (server.merge.parity).
MERGE_FORMAT_VERSION = 4
MERGE_METHOD = "W0 + per-kind float32 delta (combine: see the key), rounded once"
MANIFEST = "mergeserve-manifest.json"
PROBES = "mergeserve-probes.safetensors"
SHARD_BYTES = 200 * 10**6
log = logging.getLogger("mergeserve.cache")
# Libraries whose code decides the bytes of an entry (or of the dequantized base copy, server.boot.stored_base).
DERIVING_LIBRARIES = ("transformers", "peft", "gguf", "tokenizers")


def library_versions(names: tuple[str, ...] = DERIVING_LIBRARIES) -> dict[str, str | None]:
    """Installed version of each library (None when absent: a GGUF base cannot be read then, so nothing is keyed
    by a missing gguf), read from the package metadata as pip and the lock file record it."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _stamp(st: os.stat_result) -> list[int]:
    """What a remembered digest is checked against. Size and mtime alone can be forged: `cp -p`, `touch -r` and
    reproducible builds give a changed file its old mtime, and a retrained adapter keeps its size. ctime cannot be set
    by a user (every write or utime call moves it to now), and device + inode tell a replaced file apart."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileHashes:
    """sha256 of input files, remembered by their `_stamp` in a small JSON index inside the cache folder; any
    difference, or an entry from before the stamp had ctime and inode, means hashing the file again."""

    def __init__(self, root: Path) -> None:
        self.path = root / "file-hashes.json"
        self.lock = FileLock(str(root / "locks" / "file-hashes.lock"))
        self.known: dict[str, list[Any]] = {}
        with suppress(OSError, ValueError):
            self.known = json.loads(self.path.read_text())
        self.changed = False

    def digest(self, path: Path) -> str:
        stamp = _stamp(path.stat())
        seen = self.known.get(str(path))
        if seen and seen[:-1] == stamp:
            return str(seen[-1])
        digest = sha256_file(path)
        self.known[str(path)] = [*stamp, digest]
        self.changed = True
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record a digest just computed for a file this process wrote (a cache entry's), by its current stamp."""
        self.known[str(path)] = [*_stamp(path.stat()), digest]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        with self.lock:
            merged: dict[str, Any] = {}
            with suppress(OSError, ValueError):
                merged = json.loads(self.path.read_text())
            merged.update(self.known)
            tmp = self.path.with_name(f"file-hashes.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(merged, sort_keys=True))
            os.replace(tmp, self.path)


def tree_digests(path: Path, hashes: FileHashes) -> list[list[str]]:
    if path.is_file():
        return [[path.name, hashes.digest(path)]]
    return [[str(p.relative_to(path)), hashes.digest(p)] for p in files_under(path)]


class MergeCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("entries", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def key(self, config: Config) -> tuple[str, dict[str, Any]]:
        hashes = FileHashes(self.root)
        inputs = {
            "format": MERGE_FORMAT_VERSION,
            "method": MERGE_METHOD,
            **config.merge_identity(lambda path: tree_digests(path, hashes)),
            **library_versions(),
        }
        with suppress(OSError):
            hashes.save()  # only saves hashing next time: a full or read-only cache still has a key
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32], inputs

    def sweep(self) -> list[str]:
        """Delete what boots that died left behind: tmp-*/trash-* folders (a model's size each) and file-hashes
        temporaries; the names deleted. A folder's writer holds its key's lock for as long as the folder exists
        (`store` and `discard` run under it; the index's under its own lock), and the lock goes with the process that
        held it, on another host of a shared volume too: a folder whose lock is free now is left over. No age guess,
        which would either delete a slow replica's half-written 15 GB entry or keep a dead one's for hours."""
        swept: list[str] = []
        for path in sorted(self.root.iterdir()):
            kind, _, rest = path.name.partition("-")
            if kind in ("tmp", "trash") and path.is_dir():
                lock = self.lock(rest.rsplit("-", 2)[0])  # tmp-<key>-<pid>-<hex>; a base copy's key has a '-'
            elif path.name.startswith("file-hashes.") and path.suffix == ".tmp":
                lock = FileHashes(self.root).lock
            else:
                continue
            with suppress(Timeout, OSError), lock.acquire(timeout=0):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                swept.append(path.name)
        return swept

    def lock(self, key: str) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def hold(self, key: str) -> FileLock:
        """The key's lock, acquired. Waiting for it is logged: a replica booting behind another's merge waits for
        that whole merge and store (minutes for a 7B model) and would otherwise look hung."""
        lock = self.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("merge cache: waiting for another boot (a replica on this cache) to finish with %s", key)
            lock.acquire()
        return lock

    def entry(self, key: str) -> Path:
        return self.root / "entries" / key

    def check(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None) for a complete entry, (None, None) when there is none, (None, problem) when damaged."""
        folder = self.entry(key)
        if not folder.exists():
            return None, None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            expected: dict[str, str] = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None, "no readable manifest (an interrupted write?)"
        present = {str(p.relative_to(folder)) for p in files_under(folder)} - {MANIFEST}
        if present != set(expected):
            return None, f"files differ from the manifest: {sorted(present ^ set(expected))[:3]}"
        # Each file is re-hashed unless its stamp (size, mtime, ctime, inode, device) is the one recorded when it was
        # written or last hashed: a write of any kind moves ctime, which no user can set back. Re-hashing every hit
        # took 17.9 s of a 34 s boot of the 7.4B model (14.8 GB at ~0.8 GB/s on one core).
        hashes = FileHashes(self.root)
        for name, digest in sorted(expected.items()):
            if hashes.digest(folder / name) != digest:
                return None, f"'{name}' does not match its recorded sha256"
        with suppress(OSError):
            hashes.save()  # a read-only cache still serves its verified entries
        return manifest, None

    def discard(self, key: str) -> None:
        folder = self.entry(key)
        trash = self.root / f"trash-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with suppress(FileNotFoundError):
            os.rename(folder, trash)  # atomic: no reader sees a half-deleted entry
        shutil.rmtree(trash, ignore_errors=True)

    def store(self, key: str, config: Config, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
              probes: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:  # fmt: skip
        """Write the merged model as an entry: into tmp-*, then one rename, so readers see all of it or nothing."""
        tmp = self.root / f"tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            state = model.state_dict()
            embed, head = tied_names(model)
            tie = bool(getattr(model.config, "tie_word_embeddings", False))
            if tie and embed in state and head in state and state[embed].data_ptr() != state[head].data_ptr():
                tie = False  # the two sides differ: writing both and untying keeps each as served
            seen: set[int] = set()
            specs = []
            for name, t in state.items():
                if tie and t.data_ptr() in seen:
                    continue  # the tied head: the loader re-ties it to the embeddings
                seen.add(t.data_ptr())
                specs.append(TensorSpec(name, tuple(t.shape), t.dtype))
            dtype = next(s.dtype for s in specs if s.dtype.is_floating_point)
            write_sharded(tmp, specs, lambda s: state[s.name], SHARD_BYTES)
            write_model_files(tmp, config.model, model.config, dtype, tie, tokenizer)  # type: ignore[arg-type]
            save_file({k: v.contiguous() for k, v in probes.items()}, str(tmp / PROBES))
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in files_under(tmp)}
            manifest = {**record, "key": key, "format": MERGE_FORMAT_VERSION, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            self.discard(key)  # a damaged entry found under the lock is already gone; this is belt and braces
            os.rename(tmp, self.entry(key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        hashes = FileHashes(self.root)  # hashed above, unchanged since: the first hit need not hash them again
        for name, digest in files.items():
            hashes.remember(self.entry(key) / name, digest)
        with suppress(OSError):
            hashes.save()
        return self.entry(key)

    def probes(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.entry(key) / PROBES))
