"""Where the fused kernels' library is loaded from (server.engine.slab_ops, server.engine.kernel_store): never from a
folder another user can write, never bytes other than the ones built, a dead build never blocks the next, a library
that fails to load is rebuilt, and the build key names the compiler and the C++ ABI.

Each boot is a fresh process (this one may have the kernels loaded already, and a library cannot be unloaded). The
compiler is either the real one or a fake g++ (a shell script) that answers `--version`, marks that a compile was
started, and then fails or hangs: a build's outcome without ~30 s of compiling.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine import kernel_store, slab_ops

BOOT = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from server.engine.slab_ops import load_slab_ops
from server.load.adapters import BootError
try:
    print("eager" if load_slab_ops("{setting}", torch.device("cpu")) is None else "fused")
except BootError as exc:
    print("refused", exc)
"""
FAKE_GXX = """#!/bin/sh
case "$*" in
  *--version*) echo "g++ (fake {tag}) 12.2.0"; exit 0;;
  *-dump*) echo "12.2.0"; exit 0;;
esac
touch "$FAKE_CXX_MARK"
if [ "$FAKE_CXX_MODE" = hang ]; then sleep 300; fi
exit 1
"""


@pytest.fixture(scope="module")
def library() -> bytes:
    """The real library, as this machine's compiler builds it (shared with the kernels' own tests' build)."""
    assert slab_ops.load_slab_ops("on", torch.device("cpu")) is not None
    return (slab_ops.build_dir() / "mergeserve_slab_ops.so").read_bytes()


def _fake_gxx(folder: Path, tag: str = "a") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "g++"  # torch's builder checks the compiler's name
    path.write_text(FAKE_GXX.replace("{tag}", tag))
    path.chmod(0o755)
    return path


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MERGESERVE_KERNEL_DIR"}
    return {**env, "MERGESERVE_KERNEL_CACHE": str(cache), "FAKE_CXX_MARK": str(cache.parent / "compiled"), **extra}


def _boot(setting: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    code = BOOT.replace("{setting}", setting)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _plant(cache: Path, env: dict[str, str], library: bytes, recorded: bytes | None = None) -> Path:
    """`library` in the cache folder a boot with `env` uses, recorded as finished both the way the builder records
    a build (its sha256) and the way it used to (its size in `finished`); `recorded` is what the build made."""
    recorded = library if recorded is None else recorded
    folder = cache / _build_dir(env).name
    folder.mkdir(parents=True, mode=0o700)
    (folder / "mergeserve_slab_ops.so").write_bytes(library)
    (folder / "finished").write_text(str(len(recorded)))
    record = {"library": "mergeserve_slab_ops.so", "size": len(recorded),
              "sha256": hashlib.sha256(recorded).hexdigest(), "identity": {}}  # fmt: skip
    (folder / "build.json").write_text(json.dumps(record))
    return folder


def _build_dir(env: dict[str, str]) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        for name in ("CXX", "MERGESERVE_KERNEL_CACHE"):
            if name in env:
                mp.setenv(name, env[name])
            else:
                mp.delenv(name, raising=False)
        return slab_ops.build_dir()


def test_the_build_key_names_the_compiler_and_the_cxx_abi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library built by another compiler (its libstdc++ symbols) or for the other C++ string ABI is another build."""
    keys = []
    for tag in ("a", "b"):
        monkeypatch.setenv("CXX", str(_fake_gxx(tmp_path / tag, tag)))
        keys.append(slab_ops.build_dir().name)
    abi = torch.compiled_with_cxx11_abi()
    monkeypatch.setattr(torch, "compiled_with_cxx11_abi", lambda: not abi)
    keys.append(slab_ops.build_dir().name)
    assert len(set(keys)) == 3, keys


@pytest.mark.parametrize("damage", ["folder writable by others", "cache writable by its group", "bytes changed"])
def test_a_library_others_could_have_written_is_not_loaded(damage: str, library: bytes, tmp_path: Path) -> None:
    """The real library, planted as a finished build: in a folder others can write it is refused before anything
    is loaded; with its bytes not the recorded ones (same size: the end of the section headers, which dlopen never
    reads, so it would load) it is rebuilt, here by a compiler that fails, so the boot decodes eagerly."""
    cache = tmp_path / "cache"
    env = _env(cache, CXX=str(_fake_gxx(tmp_path / "bin")))
    changed = library[:-1] + bytes([library[-1] ^ 1]) if damage == "bytes changed" else library
    folder = _plant(cache, env, changed, recorded=library)
    if damage == "folder writable by others":
        folder.chmod(0o777)
    elif damage == "cache writable by its group":
        cache.chmod(0o770)
    done = _boot("auto", env)
    assert done.stdout.split() == ["eager"], done.stdout + done.stderr
    expected = {
        "bytes changed": "sha256 is not the one its build recorded",
        "folder writable by others": f"{folder} is writable by others",
        "cache writable by its group": f"{cache} is writable by its group",
    }
    assert expected[damage] in done.stderr, done.stderr
    assert (tmp_path / "compiled").exists() == (damage == "bytes changed")  # rebuilt only in a folder that is ours


def test_a_library_owned_by_another_user_is_not_trusted(tmp_path: Path) -> None:
    """Root may chown; anyone else checks a file of their own against another uid. Root-owned /tmp (sticky) on
    the way is fine: no one else can rename what is in it."""
    planted = tmp_path / "lib.so"
    planted.write_bytes(b"\x7fELF")
    assert kernel_store.untrusted_reason(planted) is None
    if os.geteuid() == 0:
        os.chown(planted, 4242, -1)
        reason = kernel_store.untrusted_reason(planted)
        assert reason == f"{planted} is owned by uid 4242, not by the server's user (uid 0) or root"
    else:
        reason = kernel_store.untrusted_reason(planted, uid=os.geteuid() + 1)
        assert reason is not None and "is owned by uid" in reason


def test_a_cached_library_that_fails_to_load_is_rebuilt(library: bytes, tmp_path: Path) -> None:
    """A library recorded as finished whose dlopen fails (a damaged file here; a libstdc++ older than the compiler's
    fails the same way) is rebuilt by the real compiler and loaded, not given up on."""
    cache = tmp_path / "cache"
    env = _env(cache)
    damaged = b"\x7fELF" + b"\0" * 4096
    folder = _plant(cache, env, damaged)
    done = _boot("on", env, timeout=600)
    assert done.stdout.split() == ["fused"], done.stdout + done.stderr
    assert "is unusable, rebuilding" in done.stderr
    record = json.loads((folder / "build.json").read_text())
    assert record["sha256"] == hashlib.sha256((folder / "mergeserve_slab_ops.so").read_bytes()).hexdigest()
    assert record["sha256"] != hashlib.sha256(damaged).hexdigest()


def test_a_build_killed_by_sigterm_does_not_block_the_next_boot(tmp_path: Path) -> None:
    """A first boot stopped by SIGTERM mid-compile (a container stopped during its first boot) leaves torch's lock
    file behind; the next boot builds at once instead of waiting for it forever with /health at 503."""
    cache = tmp_path / "cache"
    env = _env(cache, CXX=str(_fake_gxx(tmp_path / "bin")))
    mark = tmp_path / "compiled"
    boot = [sys.executable, "-c", BOOT.replace("{setting}", "on")]
    first = subprocess.Popen(boot, env={**env, "FAKE_CXX_MODE": "hang"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not mark.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert mark.exists(), "the first boot never started compiling"
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=60) == -signal.SIGTERM
    assert (cache / _build_dir(env).name / "lock").exists()  # what the dead build left
    mark.unlink()
    start = time.monotonic()
    try:
        done = _boot("auto", env, timeout=90)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the second boot waited on the dead build's lock for 90 s") from exc
    assert done.stdout.split() == ["eager"], done.stdout + done.stderr
    assert mark.exists(), "the second boot did not compile"
    print(f"second boot gave up on the failing compiler after {time.monotonic() - start:.1f} s")


def _prebuilt(folder: Path, library: bytes, **identity: Any) -> Path:
    folder.mkdir(mode=0o755)
    (folder / "mergeserve_slab_ops.so").write_bytes(library)
    kernel_store.write_manifest(folder, folder / "mergeserve_slab_ops.so", {**slab_ops.identity("g++"), **identity})
    return folder


@pytest.mark.parametrize("case", ["matching", "for another torch", "writable by others"])
def test_kernels_built_ahead_of_time_load_without_a_compiler(case: str, library: bytes, tmp_path: Path) -> None:
    """The image's run stage has no compiler: the build recorded in MERGESERVE_KERNEL_DIR loads when it was made
    for this source, torch, ABI and CPU (whichever compiler made it), and only from a folder no one else can write."""
    folder = _prebuilt(tmp_path / "prebuilt", library, **({"torch": "0.0"} if case == "for another torch" else {}))
    if case == "writable by others":
        folder.chmod(0o777)
    env = _env(tmp_path / "cache", CXX=str(tmp_path / "no-such-compiler"), MERGESERVE_KERNEL_DIR=str(folder))
    done = _boot("on", env)
    outcome = done.stdout.split()[0]
    if case == "matching":
        assert outcome == "fused" and "built ahead of time" in done.stderr, done.stdout + done.stderr
    else:
        assert outcome == "refused", done.stdout + done.stderr
        why = "built for another source, torch or CPU" if case == "for another torch" else "is writable by others"
        assert why in done.stdout + done.stderr


def test_prebuild_refuses_without_a_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(SystemExit, match="no C\\+\\+ compiler"):
        slab_ops.main([str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
