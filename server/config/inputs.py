"""Security checks on what a valid config makes the server load, and where its API keys come from.

Loading: weights come as safetensors or GGUF; pickle files (.bin, .pt) run code when unpickled, so they are refused
unless `security.allow_pickle` is set, and even then read with `weights_only=True`. With `security.allowed_roots`,
the model and adapter paths must resolve (symlinks followed) into one of those folders, and so must every file and
folder under them: a symlink inside an allowed folder that points out of the roots is refused too.

Calling: with API keys configured, requests carry `Authorization: Bearer <key>`. Keys are compared as SHA-256
digests with `hmac.compare_digest`, so neither a key's content nor its length shows in the answer time. /metrics
answers without a key unless `security.metrics_need_key`, as TGI's and vLLM's do (scrapers rarely carry one);
`exposure_notices` names what is open when the server listens beyond loopback, for the startup log.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from server.config.hub_id import HubId
from server.config.schema import AdapterConfig, Config, ModelConfig, SecurityConfig
from server.errors import MergeserveError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
Problem = tuple[str, str, str]  # (config key, problem, fix), as ConfigError takes them


def pickle_only(folder: Path, stem: str = "") -> Path | None:
    """The first pickle weight file of a folder that holds no safetensors (None if safetensors are there)."""
    if any(folder.glob(f"{stem}*.safetensors")):
        return None
    pickles = sorted(p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES)
    return pickles[0] if pickles else None


def _outside(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return not any(real.is_relative_to(root.resolve()) for root in roots)


def _link_out(folder: Path, roots: list[Path]) -> tuple[Path, Path] | None:
    """The first (entry, where it resolves) under `folder` that resolves outside every root, or None.

    A folder under a root can hold a symlinked weight or tokenizer file (or folder) that points anywhere; the loader
    follows it, so every entry is resolved, and linked folders inside a root are walked too (each real folder once,
    so a link loop ends). An unreadable folder is skipped: the loader cannot read it either."""
    if not folder.is_dir():
        return None
    seen: set[Path] = set()
    todo = [folder]
    while todo:
        current = todo.pop()
        if current.resolve() in seen:
            continue
        seen.add(current.resolve())
        try:
            entries = sorted(current.iterdir())
        except OSError:
            continue
        for entry in entries:
            if _outside(entry, roots):
                return entry, entry.resolve()
            if entry.is_dir():
                todo.append(entry)
    return None


def _root_problems(config: Config, roots: list[Path]) -> Iterator[Problem]:
    where = ", ".join(str(r) for r in roots)
    for key, path, _, hub in _readable(config):
        if _outside(path, roots):
            fix = "add the Hub cache (HF_HUB_CACHE) to security.allowed_roots" if hub else "move it under a root"
            yield key, f"'{path.resolve()}' is outside security.allowed_roots ({where})", fix
        elif (found := _link_out(path, roots)) is not None:
            entry, target = found
            problem = f"'{entry}' links to '{target}', outside security.allowed_roots ({where})"
            yield key, problem, "copy the file into the folder, or add where it lives to security.allowed_roots"


def _readable(config: Config) -> Iterator[tuple[str, Path, str, bool]]:
    """(key, path, weight file stem, from the Hub) of the base and each adapter on disk: a Hub id only once resolved
    (`server.store.hub` runs these checks again on what the Hub delivered)."""
    named: list[tuple[str, ModelConfig | AdapterConfig, str]] = [("model.path", config.model, "")]
    named += [(f"adapters[{i}].path", a, "adapter_model") for i, a in enumerate(config.adapters)]
    for key, item, stem in named:
        hub = isinstance(item.path, HubId)
        if not hub or item.path.snapshot is not None:  # type: ignore[union-attr]
            yield key, item.local, stem, hub


def input_problems(config: Config) -> Iterator[Problem]:
    """Everything wrong with the files and keys a valid config names, first problem first."""
    sec = config.security
    if sec.allowed_roots is not None:
        yield from _root_problems(config, sec.allowed_roots)
    if not sec.allow_pickle:
        for key, folder, stem, _ in _readable(config):
            found = pickle_only(folder, stem) if folder.is_dir() else None
            if found is not None:
                yield (
                    key,
                    f"'{found.name}' is a pickle file, which can run code when loaded",
                    "convert it to safetensors, or set security.allow_pickle: true if you trust its source",
                )
    try:
        load_api_keys(sec)
    except KeySourceError as exc:
        yield exc.key, exc.problem, exc.fix


class KeySourceError(MergeserveError):
    """A configured key source that gives no key; `key` (also `where`) is the config key that names it."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        super().__init__(problem, fix, key)


def load_api_keys(sec: SecurityConfig) -> list[str]:
    """Keys from the configured env var and/or file; [] when none is configured (the API is open).

    A configured source that yields no key is an error: an operator who asked for keys must not get an open API.
    """
    keys: list[str] = []
    if sec.api_keys_env is not None:
        from_env = [k.strip() for k in os.environ.get(sec.api_keys_env, "").split(",") if k.strip()]
        if not from_env:
            problem = f"environment variable {sec.api_keys_env} is unset or holds no key"
            raise KeySourceError("security.api_keys_env", problem, "export it (comma-separated keys)")
        keys += from_env
    if sec.api_keys_file is not None:
        try:
            lines = sec.api_keys_file.read_text().splitlines()
        except OSError as exc:
            problem = f"cannot read '{sec.api_keys_file}' ({exc.strerror})"
            raise KeySourceError("security.api_keys_file", problem, "create it, one key a line") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise KeySourceError(
                "security.api_keys_file", f"'{sec.api_keys_file}' holds no key", "write one key a line"
            )
        keys += from_file
    return keys
