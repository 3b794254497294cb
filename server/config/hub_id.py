"""Hugging Face Hub ids in `model.path` and `adapters[].path`: their syntax, checked when the config is read.

A config names a repo the way TGI, vLLM and LoRAX take it: `org/name`, optionally `@revision` (a branch, tag or
commit; a revision with a `/`, such as `refs/pr/3`, goes in the `revision` key instead), optionally a `.gguf` file
inside the repo (`org/name@rev/q4/model.gguf`, the `hf://` file syntax). Reading the config only parses that text:
nothing is downloaded or looked up until `server.store.hub` resolves the id in the boot phase `download`, so
`--help` and a config error stay instant. A local path that exists always wins over an id.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# The Hub's own rule (huggingface_hub.utils.validate_repo_id): letters, digits, '-', '_', '.', at most 96 each side.
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^/@\s]+))?(?:/(?P<file>[^@\s]+\.gguf))?$")


class HubId(BaseModel):
    """A repo on the Hub; `snapshot` and `sha` are set once `server.store.hub` has resolved it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    revision: str | None = None  # None: the repo's default branch (main)
    file: str | None = None  # a .gguf file inside the repo, relative to the subfolder
    tried: Path  # where the text would point as a local path: named when the repo is not found either
    snapshot: Path | None = None
    sha: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{rev}/{self.file}" if self.file else f"{self.repo}{rev}"


def parse_hub_id(raw: str, tried: Path) -> HubId | None:
    """The Hub id `raw` names, or None when it is not one (an absolute, ./ or ~ path never is).

    Raises ValueError ("problem | fix") for an id whose file part or revision holds `..`: the file is read at
    `snapshot / subfolder / file`, so one `..` reads any file on disk (or another repo's in the Hub cache, which
    `security.allowed_roots` must admit), and the Hub lists no such file."""
    if raw.startswith(("/", ".", "~")) or "\\" in raw:
        return None
    match = _ID.match(raw)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    if match["file"] is not None and ".." in PurePosixPath(match["file"]).parts:
        raise ValueError(
            f"the file part '{match['file']}' of Hub id '{match['repo']}' has '..', which could leave the repo | "
            "name the file by its path inside the repo, e.g. org/name/q4/model.gguf"
        )
    check_revision(match["revision"])
    return HubId(repo=match["repo"], revision=match["revision"], file=match["file"], tried=tried)


def check_revision(revision: str | None) -> str | None:
    """`revision`, or ValueError ("problem | fix") when it holds `..`: huggingface_hub reads a branch's commit from
    the file `refs/<revision>`, and git refuses `..` in a ref name (git check-ref-format), so no real ref has one."""
    if revision is not None and ".." in revision:
        raise ValueError(f"revision '{revision}' has '..', which no git ref has | give a branch, tag or commit")
    return revision


Revision = Annotated[str | None, AfterValidator(check_revision)]  # the `revision` key, checked as the path's @rev is


def with_revision(hub: HubId, revision: str | None, subfolder: str | None) -> HubId:
    """`hub` with the `revision` key applied; raises ValueError ("problem | fix") on a conflict or a bad subfolder."""
    if subfolder is not None and (subfolder.startswith("/") or ".." in Path(subfolder).parts):
        raise ValueError(f"subfolder '{subfolder}' leaves the repo | give a folder inside the repo, e.g. 'lora'")
    if revision is None:
        return hub
    if hub.revision is not None and hub.revision != revision:
        raise ValueError(f"two revisions: '@{hub.revision}' in path and revision '{revision}' | keep one of them")
    return hub.model_copy(update={"revision": revision})


def local_path(path: Path | HubId, subfolder: str | None) -> Path:
    """The file or folder to read: a local path as is, a Hub id's snapshot (plus subfolder and file) once resolved."""
    if isinstance(path, Path):
        return path
    if path.snapshot is None:
        raise RuntimeError(f"Hub id {path} is read before server.store.hub.resolve_hub resolved it")
    return path.snapshot / (subfolder or "") / (path.file or "")
