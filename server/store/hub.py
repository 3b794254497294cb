"""Hub ids in the config turned into local snapshot folders, before anything is loaded (boot phase `download`).

huggingface_hub does the work and reads its own environment: HF_TOKEN (or `hf auth login`), HF_HOME and
HF_HUB_CACHE (where snapshots live), HF_HUB_OFFLINE (cache only, no request) and HF_ENDPOINT (a mirror). Each id
becomes `snapshot_download(repo, revision, allow_patterns=...)`, and the snapshot folder's name is the commit it
resolved to: that commit goes into /info (`model_sha`), the merge cache key, the export's record and the boot log.

Only what the server reads is fetched: a base's `model*.safetensors` and index (not `consolidated.safetensors`,
Mistral's second copy of the same weights), config, generation config, tokenizer and chat template files; an
adapter's adapter_config.json, adapter_model.safetensors and the tokenizer some adapters ship; a `.gguf` only when
the id names that file. Pickles (.bin) only with `security.allow_pickle`. What arrives is then checked as a local
path is: the files each kind needs, `security.allowed_roots` (the Hub cache must be under a root) and the pickle rule.

Progress: on a terminal, huggingface_hub's own bars; otherwise (a container's log) one line per file downloaded.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import DryRunError
from tqdm.auto import tqdm

from server.config.hub_id import HubId, local_path
from server.config.inputs import input_problems
from server.config.schema import AdapterConfig, Config, ModelConfig
from server.store.hub_errors import HubError, explain

log = logging.getLogger("mergeserve.hub")
_TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
              "chat_template.json", "additional_chat_templates/*"]  # fmt: skip
BASE_FILES = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
              *_TOKENIZER]  # fmt: skip
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", *_TOKENIZER]
PICKLE_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
_WORKERS = 8  # huggingface_hub's own default for snapshot_download


def allow_patterns(item: ModelConfig | AdapterConfig, hub: HubId, allow_pickle: bool) -> list[str]:
    """The files to fetch for `item`, under its subfolder."""
    if hub.file is not None:
        names = [hub.file]
    else:
        names = (BASE_FILES if isinstance(item, ModelConfig) else ADAPTER_FILES) + (PICKLE_FILES * allow_pickle)
    prefix = f"{item.subfolder.strip('/')}/" if item.subfolder else ""
    return [prefix + name for name in names]


class _Quiet(tqdm):
    """huggingface_hub's bars, silenced: off a terminal each file gets a log line instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _fetch_logged(repo: str, revision: str, patterns: list[str]) -> None:
    """Download what is missing file by file, one log line each.

    The listing is a dry run of the same snapshot_download (same patterns, same cache): whatever it cannot do, the
    real call that follows fails at with huggingface_hub's own error.
    """
    try:
        plan = snapshot_download(repo, revision=revision, allow_patterns=patterns, dry_run=True)
    except DryRunError:
        return
    todo = [f for f in plan if f.will_download]
    if todo:
        total = sum(f.file_size or 0 for f in todo)
        log.info("hub: %s: downloading %d files, %.1f MB", repo, len(todo), total / 1e6)

    def one(name: str, size: int | None) -> None:
        hf_hub_download(repo, name, revision=revision, tqdm_class=_Quiet)
        log.info("hub: %s: %s (%.1f MB)", repo, name, (size or 0) / 1e6)

    with ThreadPoolExecutor(_WORKERS) as pool:
        for done in [pool.submit(one, f.filename, f.file_size) for f in todo]:
            done.result()


def fetch(hub: HubId, patterns: list[str]) -> Path:
    """The snapshot folder of `hub` holding `patterns`, downloading what the cache lacks."""
    revision = hub.revision
    terminal = sys.stderr.isatty()
    if not constants.is_offline_mode():
        # Resolved once: the listing and every file come from one commit even if the branch moves meanwhile, and
        # the branch -> commit entry lands in the cache's refs/, which an offline boot (and `check`) reads later.
        # huggingface_hub 2.5 writes no ref for downloads made by commit hash. A new HfApi reads HF_ENDPOINT now.
        revision = HfApi().resolve_revision(hub.repo, revision=hub.revision)
        if not terminal:
            _fetch_logged(hub.repo, revision, patterns)
    folder = snapshot_download(
        hub.repo, revision=revision, allow_patterns=patterns, tqdm_class=None if terminal else _Quiet
    )
    return Path(folder)


def resolve_one(key: str, item: ModelConfig | AdapterConfig, allow_pickle: bool) -> HubId:
    """`item`'s Hub id with its snapshot and commit; HubError (naming `key`) if it cannot be had or used."""
    hub = item.hub
    assert hub is not None
    try:
        folder = fetch(hub, allow_patterns(item, hub, allow_pickle))
    except Exception as exc:  # explain() hands back what is neither huggingface_hub's nor the network's: a bug
        raise explain(exc, key, hub) from None
    resolved = hub.model_copy(update={"snapshot": folder, "sha": folder.name})
    local = local_path(resolved, item.subfolder)
    problem = missing_files(item, local, allow_pickle)
    if problem is not None:
        raise HubError(problem[0], problem[1], f"{key} ({hub})")
    log.info("hub: %s %s -> commit %s (%s)", key, hub, resolved.sha, local)
    return resolved


def missing_files(item: ModelConfig | AdapterConfig, local: Path, allow_pickle: bool) -> tuple[str, str] | None:
    """(problem, fix) when the snapshot lacks what `item` needs to load, else None."""
    weights = "*.safetensors" if not allow_pickle else "*"
    if isinstance(item, ModelConfig):
        if local.suffix == ".gguf":
            return None if local.is_file() else (f"'{local.name}' is not in the repo", "name a .gguf file it holds")
        needed = [("config.json", "config.json"), (f"model{weights}", "model weights (model*.safetensors)")]
    else:
        needed = [("adapter_config.json", "adapter_config.json"), (f"adapter_model{weights}", "adapter weights")]
    where = f"subfolder '{item.subfolder}'" if item.subfolder else "the repo"
    for pattern, what in needed:
        if not any(local.glob(pattern)):
            fix = "check subfolder, or use a repo with safetensors weights"
            if not allow_pickle and "weights" in what:
                fix += " (security.allow_pickle: true also fetches .bin, if you trust its source)"
            return f"{where} has no {what}", fix
    return None


def resolve_hub(config: Config) -> Config:
    """`config` with every Hub id resolved to a snapshot folder, checked as local paths are; unchanged without ids."""
    if not has_hub_ids(config):
        return config
    allow_pickle = config.security.allow_pickle
    model = config.model
    if model.hub is not None:
        model = model.model_copy(update={"path": resolve_one("model.path", model, allow_pickle)})
    adapters = [
        a.model_copy(update={"path": resolve_one(f"adapters[{i}].path", a, allow_pickle)}) if a.hub else a
        for i, a in enumerate(config.adapters)
    ]
    resolved = config.model_copy(update={"model": model, "adapters": adapters})
    for key, problem, fix in input_problems(resolved):
        raise HubError(problem, fix, key)
    return resolved


def has_hub_ids(config: Config) -> bool:
    items: list[ModelConfig | AdapterConfig] = [config.model, *config.adapters]
    return any(item.hub is not None for item in items)
