"""Where an export is written before it appears at `--out`: an empty mount point (a volume, a bind mount) must get
the export; a rename across it fails (EXDEV) and it cannot be removed (EBUSY)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.config.load import load_config
from server.store import export as export_module
from server.store.export import export_merged

Writer = Callable[[dict[str, Any]], Path]


def _mount_point(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `out` behave as a mount point does: its own filesystem, and busy as a whole."""
    real_rename, real_rmdir = os.rename, os.rmdir

    def on_mount(path: Any) -> bool:
        path = Path(os.path.abspath(path))
        return path == out or out in path.parents

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(os.path.abspath(src)) == out or Path(os.path.abspath(dst)) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(out))
        if on_mount(src) != on_mount(dst):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        real_rename(src, dst, *args, **kwargs)

    def rmdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("dir_fd") and Path(os.path.abspath(path)) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(out))
        real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "rmdir", rmdir)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_into_an_empty_mount_point_lands_there(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tiny_config_data | {"cache": {"enabled": False}}))
    plain = tmp_path / "plain"
    export_merged(config, plain, max_shard_bytes=100_000)
    out = tmp_path / "volume"
    killed = out / ".volume.partial-999999"  # what an export killed while writing into it leaves
    killed.mkdir(parents=True)
    (killed / "model-00001-of-00002.safetensors").write_bytes(b"half written")
    before = set(tmp_path.iterdir())
    _mount_point(out, monkeypatch)
    result = export_merged(config, out, max_shard_bytes=100_000)
    assert result.out == out and _tree(out) == _tree(plain)  # every file, byte for byte, and nothing else
    assert set(tmp_path.iterdir()) == before  # no staging folder left beside it


def test_a_failed_export_into_a_mount_point_leaves_it_empty(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tiny_config_data | {"cache": {"enabled": False}}))
    out = tmp_path / "volume"
    out.mkdir()
    before = set(tmp_path.iterdir())
    _mount_point(out, monkeypatch)

    def full(*_: Any, **__: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_module, "write_sharded", full)
    with pytest.raises(OSError, match="No space"):
        export_merged(config, out)
    assert out.is_dir() and not any(out.iterdir()) and set(tmp_path.iterdir()) == before
