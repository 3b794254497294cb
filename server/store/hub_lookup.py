"""Hub ids resolved for `mergeserve check`: the commit, and whether the local Hub cache already holds what serve reads.

Nothing is downloaded. The local Hub cache answers first (`local_files_only`); an id it cannot serve is then asked
of the Hub as a dry run of the very `snapshot_download` serve would make (metadata requests only: the commit and the
files it would fetch, with their sizes), unless HF_HUB_OFFLINE is set, in which case serve would refuse it and so
does check, with serve's line. A branch the cache holds is reported at the commit the cache last saw: serve, when
online, asks the Hub again and fetches a newer commit's files if the branch moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from server.config.hub_id import HubId, local_path
from server.config.inputs import input_problems
from server.config.schema import AdapterConfig, Config, ModelConfig
from server.store.hub import allow_patterns, missing_files
from server.store.hub_errors import HubError, explain


@dataclass(frozen=True)
class Located:
    """One Hub id's state: `cached` when its snapshot holds every file serve reads (then `hub.snapshot` is set)."""

    key: str
    source: str
    commit: str | None
    cached: bool
    note: str


def _cached(key: str, item: ModelConfig | AdapterConfig, hub: HubId, patterns: list[str],
            allow_pickle: bool) -> HubId | None:  # fmt: skip
    """`hub` at the snapshot the local cache holds, if it has what `item` needs; else None, or offline serve's error."""
    try:
        found = snapshot_download(hub.repo, revision=hub.revision, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode():
            raise explain(exc, key, hub) from None
        return None
    resolved = hub.model_copy(update={"snapshot": Path(found), "sha": Path(found).name})
    problem = missing_files(item, local_path(resolved, item.subfolder), allow_pickle)
    if problem is not None and constants.is_offline_mode():
        raise HubError(problem[0], problem[1], f"{key} ({hub})")  # as resolve_one raises it
    return resolved if problem is None else None


def locate_one(key: str, item: ModelConfig | AdapterConfig, allow_pickle: bool) -> tuple[HubId, Located]:
    """`item`'s Hub id resolved as far as possible without downloading; offline, serve's HubError for a miss."""
    hub = item.hub
    assert hub is not None
    patterns = allow_patterns(item, hub, allow_pickle)
    resolved = _cached(key, item, hub, patterns, allow_pickle)
    if resolved is not None:
        return resolved, Located(key, str(hub), resolved.sha, True, f"cached ({resolved.snapshot})")
    try:
        plan = snapshot_download(hub.repo, revision=hub.revision, allow_patterns=patterns, dry_run=True)
    except Exception as exc:
        raise explain(exc, key, hub) from None
    todo = [f for f in plan if f.will_download]
    commit = plan[0].commit_hash if plan else None
    size = sum(f.file_size or 0 for f in todo) / 1e6
    note = f"not cached: serve would download {len(todo)} files, {size:.1f} MB"
    return hub.model_copy(update={"sha": commit}), Located(key, str(hub), commit, False, note)


def locate_hub(config: Config) -> tuple[Config, list[Located]]:
    """`config` with each cached Hub id at its snapshot (others keep their commit only), and each id's state."""
    allow_pickle = config.security.allow_pickle
    found: list[Located] = []
    model = config.model
    if model.hub is not None:
        hub, state = locate_one("model.path", model, allow_pickle)
        model, found = model.model_copy(update={"path": hub}), [state]
    adapters = []
    for i, adapter in enumerate(config.adapters):
        if adapter.hub is not None:
            hub, state = locate_one(f"adapters[{i}].path", adapter, allow_pickle)
            adapter, found = adapter.model_copy(update={"path": hub}), [*found, state]
        adapters.append(adapter)
    located = config.model_copy(update={"model": model, "adapters": adapters})
    if all(state.cached for state in found):
        for key, problem, fix in input_problems(located):  # what serve checks once the snapshots are there
            raise HubError(problem, fix, key)
    return located, found
