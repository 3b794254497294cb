"""huggingface_hub's exceptions as one line naming the config key, the id and the fix (exit 2: restarting won't help).

Offline (HF_HUB_OFFLINE=1), an unknown repo and a missing revision both arrive as LocalEntryNotFoundError: the Hub
cache is what tells them apart (the repo is cached under other revisions, or not at all), so the line can say which.
"""

from __future__ import annotations

from huggingface_hub import constants, get_token, scan_cache_dir
from huggingface_hub.errors import (
    CacheNotFound,
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from server.config.hub_id import HubId
from server.errors import MergeserveError

_CACHE_FIX = "point HF_HUB_CACHE at a cache that holds it, or fix the id"


class HubError(MergeserveError):
    """A Hub id that cannot be resolved, or whose snapshot cannot be served; `where` names the config key and id."""


def cached_revisions(repo: str) -> list[str] | None:
    """The refs (branches, tags) and commits the Hub cache holds for `repo`; None when the repo is not cached."""
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)  # its default is bound at import, the constant is current
    except CacheNotFound:
        return None
    for cached in info.repos:
        if cached.repo_id == repo and cached.repo_type == "model":
            refs = sorted({ref for rev in cached.revisions for ref in rev.refs})
            return refs + sorted(rev.commit_hash[:12] for rev in cached.revisions)
    return None


def _not_cached(hub: HubId) -> tuple[str, str]:
    """(problem, fix) for an id the cache cannot serve while the Hub is off or out of reach."""
    why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"the Hub ({constants.ENDPOINT}) is unreachable"
    fix = "unset HF_HUB_OFFLINE where the Hub is reachable" if constants.is_offline_mode() else "check the network"
    fix = f"{fix}, {_CACHE_FIX}"
    known = cached_revisions(hub.repo)
    if known is None:
        where = f"the Hub cache ({constants.HF_HUB_CACHE})"
        return f"'{hub.repo}' is not in {where}, nor a local path ('{hub.tried}'), and {why}", fix
    revision = hub.revision or constants.DEFAULT_REVISION
    cached = ", ".join(known)
    return f"revision '{revision}' of '{hub.repo}' is not in the Hub cache (cached: {cached}), and {why}", fix


def _http(exc: HfHubHTTPError, hub: HubId) -> tuple[str, str]:
    """(problem, fix) for the Hub's own answer."""
    token = "no token is set" if get_token() is None else "the token given has no access"
    if isinstance(exc, GatedRepoError):
        return (
            f"'{hub.repo}' is a gated repo and {token}",
            f"accept its terms at {constants.ENDPOINT}/{hub.repo} and set HF_TOKEN (or run `hf auth login`)",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"no repo '{hub.repo}' on {constants.ENDPOINT} ({token}), and no local path '{hub.tried}'",
            "check the id (a private repo needs HF_TOKEN) or the local path",
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"'{hub.repo}' has no revision '{hub.revision}'", "give an existing branch, tag or commit"
    if isinstance(exc, DisabledRepoError):
        return f"'{hub.repo}' is disabled on the Hub", "use another repo"
    status = exc.response.status_code if exc.response is not None else "?"
    return f"the Hub answered {status} for '{hub.repo}'", "check HF_TOKEN and HF_ENDPOINT, or retry later"


def explain(exc: Exception, key: str, hub: HubId) -> Exception:
    """A HubError for what huggingface_hub raised; any other exception is handed back unchanged (a bug)."""
    where = f"{key} ({hub})"
    if isinstance(exc, IncompleteSnapshotError):
        problem = f"the cached snapshot of '{hub}' lacks files and the Hub cannot complete it"
        return HubError(problem, "download it again where the Hub is reachable", where)
    if isinstance(exc, LocalEntryNotFoundError):
        return HubError(*_not_cached(hub), where)
    if isinstance(exc, HfHubHTTPError):
        return HubError(*_http(exc, hub), where)
    if isinstance(exc, HFValidationError):
        return HubError(f"'{hub}' is not a valid Hub id ({_first_line(exc)})", "write it as org/name[@revision]", where)
    if isinstance(exc, OSError):  # a full disk, a read-only cache, a dropped connection mid-file
        problem = f"cannot fetch '{hub}' ({_first_line(exc)})"
        return HubError(problem, "check the disk under HF_HUB_CACHE and the network", where)
    return exc


def _first_line(exc: Exception) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
