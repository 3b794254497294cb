"""The merge cache's failure paths on the tiny model: a read-only or full cache folder costs the cache, not the boot,
and what a killed boot left behind (tmp-*/trash-* folders) is swept at the next one."""

from __future__ import annotations

import errno
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from filelock import FileLock

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from server.http.app import create_app
from server.store.cache import MergeCache

Writer = Callable[[dict[str, Any]], Path]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _refuse_writes(root: Path, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write under `root` fails with `code`, as on a read-only mount (EROFS) or a full disk (ENOSPC: new
    files and folders fail, opening an existing file does not). The tests run as root in CI, where a chmod would
    not stop a write, and mounting needs privileges; so the calls the cache writes through are refused instead."""
    real_io_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
    real = {name: getattr(os, name) for name in ("rename", "replace", "rmdir", "unlink", "remove")}

    def under(path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(root)

    def refuse(path: Any) -> OSError:
        return OSError(code, os.strerror(code), str(path))

    def io_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if under(file) and any(c in mode for c in "wax+"):
            raise refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        writes = flags & WRITE_FLAGS if code == errno.EROFS else flags & os.O_CREAT and not os.path.lexists(path)
        if under(path) and writes and not kwargs.get("dir_fd"):
            raise refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if under(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) if os.path.isdir(path) else refuse(path)
        real_mkdir(path, *args, **kwargs)

    def refusing(name: str) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if under(path) and not kwargs.get("dir_fd"):
                raise refuse(path)
            return real[name](path, *args, **kwargs)

        return call

    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    if code == errno.EROFS:  # a full disk still renames and deletes
        for name in real:
            monkeypatch.setattr(os, name, refusing(name))


def _logits(engine: Engine) -> torch.Tensor:
    ids = torch.tensor([engine.tokenize("Arr matey, the capital of France is")])
    with torch.inference_mode():
        return engine.model(input_ids=ids).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("code", "before"), [(errno.EROFS, "entry"), (errno.ENOSPC, "folder"), (errno.ENOSPC, "lock file")]
)
def test_a_read_only_or_full_cache_serves_with_the_cache_marked_unavailable(
    code: int, before: str, write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Read-only: a volume holding the entry, mounted read-only (the key's lock cannot be taken). Full: a cache folder
    from an earlier boot, on a full disk: file-hashes.json cannot be written, nor the key's lock file, or when that
    exists already (an earlier boot of this config failed), the entry."""
    config = load_config(write_config(tiny_config_data))
    cache = MergeCache(merge_cache)  # the folder and its entries/ and locks/ exist
    expected = _logits(boot(config)) if before == "entry" else None
    if before == "lock file":
        with cache.lock(cache.key(config)[0]):
            pass
    _refuse_writes(merge_cache, code, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mergeserve.cache"):
        engine = boot(config)
    problem = os.strerror(code)
    assert engine.info.cache["status"] == "unavailable" and problem in engine.info.cache["problem"]
    assert "merge cache" in caplog.text and problem in caplog.text
    assert ("store failed" in engine.info.cache["problem"]) == (before == "lock file")
    if expected is not None:
        assert torch.equal(_logits(engine), expected)
    client = TestClient(create_app(engine, config))
    info = client.get("/info").json()
    assert info["cache"]["status"] == "unavailable" and problem in info["cache"]["problem"]
    assert "mergeserve_merge_cache_available 0.0" in client.get("/metrics").text
    assert client.post("/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_the_metrics_say_a_usable_cache_is_available(write_config: Writer, tiny_config_data: dict[str, Any]) -> None:
    config = load_config(write_config(tiny_config_data))
    assert "mergeserve_merge_cache_available 1.0" in TestClient(create_app(boot(config), config)).get("/metrics").text


def test_what_a_killed_boot_left_is_swept_and_what_a_live_one_writes_is_kept(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path
) -> None:
    """A folder's writer holds its key's lock while the folder exists (store and discard run under it), and the
    lock goes with the process that held it: a folder whose key's lock is free was left by a boot that died."""
    MergeCache(merge_cache)
    left = [merge_cache / "tmp-0123abcd-4242-deadbeef", merge_cache / "trash-base-4567ef-4242-0badf00d"]
    live = merge_cache / "tmp-89abcdef-4343-c0ffee00"
    for folder in (*left, live):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "model.safetensors").write_bytes(b"half written")
    stale_index = merge_cache / "file-hashes.4242.deadbeef.tmp"
    stale_index.write_text("{")
    other_boot = FileLock(str(merge_cache / "locks" / "89abcdef.lock"))
    other_boot.acquire()  # another replica is writing that entry right now
    try:
        engine = boot(load_config(write_config(tiny_config_data)))
    finally:
        other_boot.release()
    assert engine.info.cache["status"] == "miss"
    assert not any(f.exists() for f in left) and not stale_index.exists()
    assert (live / "sub" / "model.safetensors").read_bytes() == b"half written"
    assert sorted(p.name for p in merge_cache.iterdir()) == sorted(["entries", "locks", "file-hashes.json", live.name])
