"""The fused decode kernels (csrc/slab_ops.cpp) and the half-precision linear layer (csrc/half_linear.cpp, used by
server.engine.half_linear): one library, compiled for this CPU on first use, then loaded from a cache.

They are C++ compiled by torch's extension builder (g++ and ninja), with `-march=native` for the machine that serves,
so the build is keyed by the source, torch's version and this CPU's feature flags, and kept under
`$MERGESERVE_KERNEL_CACHE` (default `~/.cache/mergeserve/kernels`): the first boot on a machine compiles for ~30 s on
2 cores, later boots load in well under a second. `engine.fused_kernels: auto` falls back to the eager decode (with
a warning) where they cannot be built, e.g. a container without a compiler; `on` refuses to boot there instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from server.load.adapters import BootError

log = logging.getLogger("mergeserve.kernels")

FusedSetting = Literal["auto", "on", "off"]
# The decode kernels, and the half-precision linear layer (server.engine.half_linear): one library, one build.
SOURCES = [Path(__file__).with_name("csrc") / name for name in ("slab_ops.cpp", "half_linear.cpp")]
_NAME = "mergeserve_slab_ops"
_FINISHED = "finished"  # the library's size in bytes, written once the builder has returned
# -fopenmp: at::parallel_for's OpenMP pragma, else it runs serially. -fno-trapping-math lets GCC vectorize the exp
# loops (it changes no rounding: only the assumption that a float op may trap, which nothing here catches).
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
_STALE_LOCK_SECONDS = 600


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.processor())


def build_dir() -> Path:
    """Where this source, for this torch and CPU, is built: a different CPU sharing the home directory gets its own."""
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256(b"\0".join(s.encode() for s in (*texts, torch.__version__, _cpu_flags(),
                                                           " ".join(_FLAGS)))).hexdigest()[:16]  # fmt: skip
    root = os.environ.get("MERGESERVE_KERNEL_CACHE") or Path.home() / ".cache" / "mergeserve" / "kernels"
    return Path(root) / key


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's builder runs `ninja` from PATH; the PyPI package's binary is in the venv, which PATH may not name
    (a server started as `.venv/bin/python -m server`)."""
    import ninja  # the PyPI package of the ninja build tool

    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, saved])
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _drop_stale_lock(lock: Path) -> None:
    """torch's builder holds `lock` while it compiles and waits, without end, for another process's to go. A process
    killed mid-build (a container stopped during its first boot) leaves it behind on the cache volume, and every
    later boot would hang: one older than any build takes (~30 s here) is removed."""
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > _STALE_LOCK_SECONDS:
            log.warning("removing a kernel build lock left %.0f s ago by a process that died: %s", age, lock)
            lock.unlink()


def _library(folder: Path) -> Path:
    """The shared library torch's builder links in `folder` (named after the extension)."""
    return folder / f"{_NAME}.so"


def _load_finished_build(folder: Path) -> bool:
    """Load the library an earlier boot built here, without the builder. The builder would rebuild it for another
    install of the same source and torch (its ninja file names the source's and torch's paths): a checkout and a venv
    sharing the cache would each recompile, ~25 s, every time the other had booted. Only a library whose build
    finished counts (its size is recorded after the builder returns): dlopen of one cut short mid-link is a SIGBUS,
    not an error, so a build killed part-way is left to the builder, which redoes it."""
    library, record = _library(folder), folder / _FINISHED
    try:
        finished = int(record.read_text()) == library.stat().st_size
    except (OSError, ValueError):
        return False
    if finished:
        torch.ops.load_library(str(library))
    return finished


def _build() -> Any:
    if hasattr(torch.ops.mergeserve, "slab_attend"):  # loaded by an earlier boot in this process (tests, tools):
        return torch.ops.mergeserve  # a second load would register the op namespace twice, which aborts
    folder = build_dir()
    if _load_finished_build(folder):
        return torch.ops.mergeserve
    from torch.utils import cpp_extension  # imports setuptools: only when building

    folder.mkdir(parents=True, exist_ok=True)
    _drop_stale_lock(folder / "lock")
    # The old record goes first: a library being relinked passes through every size, the recorded one included.
    (folder / _FINISHED).unlink(missing_ok=True)
    with _ninja_on_path():
        cpp_extension.load(name=_NAME, sources=[str(source) for source in SOURCES], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False)  # fmt: skip
    (folder / _FINISHED).write_text(str(_library(folder).stat().st_size))
    return torch.ops.mergeserve


def load_slab_ops(setting: FusedSetting, device: torch.device) -> Any | None:
    """`torch.ops.mergeserve` with the fused kernels, or None: for `off`, off the CPU, or (`auto`) if the build fails.
    Raises BootError for `on` where they cannot be had."""
    if setting == "off":
        return None
    if device.type != "cpu":
        if setting == "on":
            raise BootError(f"engine.fused_kernels: on, but the model is on {device.type}; the kernels are CPU-only",
                            "set engine.fused_kernels: auto or off", "engine.fused_kernels")  # fmt: skip
        return None
    try:
        return _build()
    except Exception as exc:  # a missing compiler or ninja, a compile error: all mean "not here"
        if setting == "on":
            raise BootError(f"engine.fused_kernels: on, but building them failed: {str(exc).splitlines()[0][:300]}",
                            "install g++ (Debian: apt-get install g++), or set engine.fused_kernels: auto or off",
                            "engine.fused_kernels") from exc  # fmt: skip
        log.warning("fused decode kernels unavailable, decoding eagerly: %s", str(exc).splitlines()[0][:300])
        return None
