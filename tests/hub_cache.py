"""A real Hugging Face Hub cache, written the way huggingface_hub writes one, for tests without the network.

Layout (huggingface_hub's cache guide, "Understand caching"), under HF_HUB_CACHE:
    models--<org>--<name>/blobs/<hash>               each file's bytes once, named by a hash of them
    models--<org>--<name>/refs/<revision>            a branch or tag name; the file holds the commit hash
    models--<org>--<name>/snapshots/<commit>/<path>  relative symlinks into ../../blobs (deeper for subfolders)

`test_hub.py` checks this builder against huggingface_hub itself (snapshot_download with local_files_only, and
scan_cache_dir, which reports any layout it does not recognise), so the boots that use it go through the real
resolution code path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

BASE, LORA = "test-org/tiny-llama", "test-org/tiny-lora"


def repo_folder(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def publish(cache: Path, repo: str, files: Path, refs: tuple[str, ...] = ("main",), subfolder: str = "") -> str:
    """Add a commit holding every file under `files` (at `subfolder` in the repo) and point `refs` at it.

    The commit hash is a sha1 over the repo and file contents, as a git commit id is 40 hex digits; publishing the
    same files twice gives the same commit unless `refs` differ (then the ref names go into it as a commit message).
    """
    folder = repo_folder(cache, repo)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    contents = sorted((p.relative_to(files), p.read_bytes()) for p in files.rglob("*") if p.is_file())
    commit = hashlib.sha1(repo.encode() + repr(refs).encode() + b"".join(b for _, b in contents)).hexdigest()
    snapshot = folder / "snapshots" / commit
    for rel, data in contents:
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / subfolder / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        point(cache, repo, ref, commit)
    return commit


def point(cache: Path, repo: str, ref: str, commit: str) -> None:
    """Move branch or tag `ref` to `commit`, as a later download of a moved branch records it."""
    path = repo_folder(cache, repo) / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)  # no newline: huggingface_hub reads the file whole


def hub_config(base: str, adapter: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": {"path": base, "dtype": "float32"},
        "adapters": [{"name": "alpha", **adapter}],
        "limits": {"max_input_tokens": 64, "max_total_tokens": 96, "max_new_tokens": 4},
        **extra,
    }
