"""Where the fused kernels' compiled library may be loaded from, and how a build is recorded and serialized.

Loading a shared library runs its code in the server, whose environment holds `HF_TOKEN` and the API keys. So a
library is loaded only from a folder no other user can write (every folder from `/` down owned by root or the
server's user and not group- or world-writable; a sticky folder owned by root, like /tmp, may be on the way, since
no one else can rename what is in it), and only once its content matches the sha256 recorded when it was built.

A build holds an exclusive `flock` on a file beside its folder: the kernel drops it when the process dies, however
it dies, so a build killed by SIGTERM leaves nothing that stops the next boot (torch's own lock file does).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "build.json"  # written after the build: the library's name, size, sha256 and the identity it was built for


class KernelError(Exception):
    """The kernels cannot be had from here: `problem` says why, `fix` what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _chain(path: Path) -> list[Path]:
    """`path` and every folder above it, both as written and with symlinks resolved: a symlink is only as safe as
    the folder holding it, and its target only as safe as the folders above the target."""
    written = Path(os.path.abspath(path))
    return list(dict.fromkeys([written, *written.parents, path.resolve(), *path.resolve().parents]))


def untrusted_reason(path: Path, uid: int | None = None) -> str | None:
    """Why another user could replace what is at `path`, or None. Owners allowed: root and `uid` (default: ours)."""
    uid = os.geteuid() if uid is None else uid
    target = Path(os.path.abspath(path))
    for part in _chain(path):
        info = os.lstat(part)
        if stat.S_ISLNK(info.st_mode):
            continue  # its folder is checked, and so is what it points to
        if info.st_uid not in (0, uid):
            return f"{part} is owned by uid {info.st_uid}, not by the server's user (uid {uid}) or root"
        sticky_root = part != target and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX and not info.st_uid
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root:
            return f"{part} is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def require_trusted(path: Path) -> None:
    reason = untrusted_reason(path)
    if reason:
        raise KernelError(f"not loading kernels from {path}: {reason}",
                          "chmod go-w and chown it to the server's user, or point MERGESERVE_KERNEL_CACHE at a "
                          "folder only that user can write")  # fmt: skip


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, library: Path, identity: dict[str, Any]) -> None:
    """Record `library` (inside `folder`) as built for `identity`; written to a temporary name and renamed, so a
    reader sees the whole record or none."""
    record = {"library": library.name, "size": library.stat().st_size, "sha256": sha256_of(library),
              "identity": identity}  # fmt: skip
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    partial.chmod(0o644)
    partial.replace(folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The record of a finished build in `folder`, or None where there is none (or it is not a record)."""
    try:
        record = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("library"), str) else None


def verified_library(folder: Path, record: dict[str, Any]) -> Path:
    """The recorded library, once its folder is trusted and its bytes are the ones built: a library cut short
    mid-link is a SIGBUS at dlopen, not an error, and a replaced one is someone else's code."""
    library = folder / Path(record["library"]).name
    require_trusted(library)
    if not library.is_file() or library.stat().st_size != record.get("size"):
        raise KernelError(f"{library} is not the size its build recorded", "it is rebuilt where it can be")
    if sha256_of(library) != record.get("sha256"):
        raise KernelError(f"{library}'s sha256 is not the one its build recorded", "it is rebuilt where it can be")
    return library


@contextlib.contextmanager
def build_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600). Another live process building the same kernels is waited
    for, at most `timeout` seconds (a build takes ~30 s on 2 cores); a dead one's lock is already gone."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KernelError(f"another process has been building the kernels for {timeout:.0f} s ({path})",
                                      "stop the other process, or set engine.fused_kernels: off") from None  # fmt: skip
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the flock
