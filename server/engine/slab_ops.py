"""The fused decode kernels (csrc/slab_ops.cpp) and the half-precision linear layer (csrc/half_linear.cpp, used by
server.engine.half_linear): one library, compiled with `-march=native` for the CPU that serves.

Where it comes from, in order:
1. `$MERGESERVE_KERNEL_DIR`, a read-only folder built ahead of time (the image builds it at /opt/mergeserve/kernels,
   owned by root: `python -m server.engine.slab_ops DIR`), used when its record names this source, torch, C++ ABI,
   CPU and flags. The image's run stage has no compiler, so on another CPU it decodes eagerly.
2. `$MERGESERVE_KERNEL_CACHE` (default `~/.cache/mergeserve/kernels`), where torch's extension builder (g++ and
   ninja) compiles it on first use (~30 s on 2 cores; later boots load in well under a second), in a folder keyed by
   all of the above and the compiler: two compilers sharing a cache each get their own build.
Both are loaded only through server.engine.kernel_store's checks (a folder no other user can write, the sha256
recorded at build). A cached library that fails to load (a libstdc++ older than the compiler's, a damaged file) is
rebuilt. `engine.fused_kernels: auto` falls back to the eager decode (with a warning) where the kernels cannot be
had, e.g. a container without a compiler on a CPU the image was not built on; `on` refuses to boot there instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from server.engine.kernel_store import (
    KernelError,
    build_lock,
    read_manifest,
    require_trusted,
    verified_library,
    write_manifest,
)
from server.load.adapters import BootError

log = logging.getLogger("mergeserve.kernels")

FusedSetting = Literal["auto", "on", "off"]
# The decode kernels, and the half-precision linear layer (server.engine.half_linear): one library, one build.
SOURCES = [Path(__file__).with_name("csrc") / name for name in ("slab_ops.cpp", "half_linear.cpp")]
_NAME = "mergeserve_slab_ops"
# -fopenmp: at::parallel_for's OpenMP pragma, else it runs serially. -fno-trapping-math lets GCC vectorize the exp
# loops (it changes no rounding: only the assumption that a float op may trap, which nothing here catches).
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
_INSTALL_GXX = "install g++ (Debian: apt-get install g++), or set engine.fused_kernels: auto or off"
_BUILD_WAIT_SECONDS = 600  # another live process's build: ~30 s here, so this is one that is stuck


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.processor())


def compiler() -> str | None:
    """The C++ compiler torch's builder would run ($CXX, else c++): its real path and `--version` line, or None
    where there is none. A library built by a newer g++ needs that g++'s libstdc++ symbols (GLIBCXX_*)."""
    found = shutil.which(os.environ.get("CXX", "c++"))
    if found is None:
        return None
    try:
        done = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (done.stdout.splitlines() or [""])[0]
    return f"{os.path.realpath(found)}: {first}" if done.returncode == 0 else None


def identity(cxx: str | None) -> dict[str, Any]:
    """What a built library depends on. The C++ ABI: torch built with the old or new libstdc++ string ABI, and its
    pybind11 ABI tag, must be the extension's, or symbols fail to resolve at load."""
    sources = hashlib.sha256(b"\0".join(source.read_bytes() for source in SOURCES)).hexdigest()
    cxx11 = torch.compiled_with_cxx11_abi()
    pybind = getattr(torch._C, "_PYBIND11_BUILD_ABI", None)
    return {"sources": sources, "torch": torch.__version__, "cxx_abi": f"cxx11={cxx11} pybind11={pybind}",
            "cpu": hashlib.sha256(_cpu_flags().encode()).hexdigest(), "flags": _FLAGS, "compiler": cxx}  # fmt: skip


def _key(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("MERGESERVE_KERNEL_CACHE") or Path.home() / ".cache" / "mergeserve" / "kernels")


def build_dir() -> Path:
    """Where this source is built for this torch, ABI, CPU and compiler: another CPU or compiler sharing the cache
    gets its own folder."""
    return cache_root() / _key(identity(compiler()))


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


def _compile(folder: Path) -> Path:
    """Compile (and load) the library in `folder` with torch's builder; its path."""
    from torch.utils import cpp_extension  # imports setuptools: only when building

    with _ninja_on_path():
        built = cpp_extension.load(name=_NAME, sources=[str(s) for s in SOURCES], extra_cflags=_FLAGS,
                                   extra_ldflags=["-fopenmp"], build_directory=str(folder),
                                   is_python_module=False)  # fmt: skip
    return Path(str(built))


def _load_prebuilt(folder: Path, ident: dict[str, Any]) -> bool:
    """Load the ahead-of-time build in `folder` if it was made for this process (whatever compiler made it)."""
    record = read_manifest(folder)
    if record is None:
        log.warning("no kernel build recorded in MERGESERVE_KERNEL_DIR %s", folder)
        return False
    mine = {k: v for k, v in ident.items() if k != "compiler"}
    if {k: v for k, v in record.get("identity", {}).items() if k != "compiler"} != mine:
        log.info("the kernels in %s were built for another source, torch or CPU: not used", folder)
        return False
    library = verified_library(folder, record)
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:
        log.warning("the kernels in %s fail to load: %s", folder, str(exc)[:300])
        return False
    log.info("fused kernels loaded from %s (built ahead of time)", library)
    return True


def _load_cached(folder: Path) -> bool:
    """Load an earlier boot's build in `folder`; False (with the folder emptied for a rebuild) where there is none
    that verifies and loads."""
    record = read_manifest(folder)
    if record is None:
        return False
    try:
        library = verified_library(folder, record)
        torch.ops.load_library(str(library))
    except (KernelError, OSError) as exc:
        log.warning("cached kernel build in %s is unusable, rebuilding: %s", folder, str(exc)[:300])
        shutil.rmtree(folder)  # the builder would relink nothing if the objects and library looked up to date
        folder.mkdir(mode=0o700)
        return False
    log.info("fused kernels loaded from %s", library)
    return True


def _build_in_cache(ident: dict[str, Any]) -> None:
    root = cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_trusted(root)
    folder = root / _key(ident)
    with build_lock(root / f"{folder.name}.lock", _BUILD_WAIT_SECONDS):
        folder.mkdir(mode=0o700, exist_ok=True)
        require_trusted(folder)
        if _load_cached(folder):
            return
        # We hold the build lock, so a torch lock file here is a dead build's, on which torch's builder would wait
        # forever; the old record goes too, as a library being relinked passes through every size.
        (folder / "lock").unlink(missing_ok=True)
        (folder / "build.json").unlink(missing_ok=True)
        write_manifest(folder, _compile(folder), ident)


def _build() -> Any:
    if hasattr(torch.ops.mergeserve, "slab_attend"):  # loaded by an earlier boot in this process (tests, tools):
        return torch.ops.mergeserve  # a second load would register the op namespace twice, which aborts
    cxx = compiler()
    ident = identity(cxx)
    prebuilt = os.environ.get("MERGESERVE_KERNEL_DIR")
    if prebuilt and _load_prebuilt(Path(prebuilt), ident):
        return torch.ops.mergeserve
    if cxx is None:
        raise KernelError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) to build the kernels for this machine",
                          _INSTALL_GXX)  # fmt: skip
    _build_in_cache(ident)
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
    except Exception as exc:  # a missing compiler or ninja, a compile error, a folder others can write: "not here"
        why = str(exc).splitlines()[0][:300]
        if setting == "on":
            fix = exc.fix if isinstance(exc, KernelError) else _INSTALL_GXX
            raise BootError(
                f"engine.fused_kernels: on, but the kernels cannot be had: {why}", fix, "engine.fused_kernels"
            ) from exc
        log.warning("fused decode kernels unavailable, decoding eagerly: %s", why)
        return None


def prebuild(out: Path) -> Path:
    """Compile the kernels into `out` ahead of time (an image build, as root): the library and its record only, made
    read-only for everyone else; the objects and ninja files stay in a scratch folder."""
    cxx = compiler()
    if cxx is None:
        raise SystemExit("slab_ops: no C++ compiler; fix: install g++ (Debian: apt-get install g++) or set CXX")
    out.mkdir(mode=0o755, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mergeserve-kernels-") as scratch:
        library = out / f"{_NAME}.so"
        shutil.copyfile(_compile(Path(scratch)), library)
    library.chmod(0o644)
    write_manifest(out, library, identity(cxx))
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the fused kernels ahead of time into a read-only folder "
                                     "that MERGESERVE_KERNEL_DIR then names.")  # fmt: skip
    parser.add_argument("out", type=Path, help="the folder (created), e.g. /opt/mergeserve/kernels")
    args = parser.parse_args(argv)
    print(f"slab_ops: built {prebuild(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
