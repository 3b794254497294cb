"""The container image, built for real: scripts/build_image.py builds the Dockerfile on a debootstrapped Debian base
(buildah, chroot isolation), podman runs it as it ships (its entrypoint, its default demo config, its non-root user),
and a real HTTP client sees /health turn 200 and /generate answer with the tokens that PEFT's own merge of the demo,
run here on the host, gives for the same prompt.

Needs root with debootstrap, buildah, podman and runc (scripts/test.sh installs them with apt-get); without them the
test skips and says which is missing. The first build takes minutes (debootstrap, torch and the dependencies); the
base tarball and buildah's layers are cached, so the next one reuses everything but changed code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tests.live_server import REPO
from tests.reference import assert_served_like_reference

pytestmark = pytest.mark.e2e
TAG = "localhost/mergeserve:cpu-test"
TOOLS = ("debootstrap", "buildah", "podman", "runc")
PROMPT = "Where be the treasure buried?"
MAX_NEW = 16
TOL = 1e-4  # float32 on both sides, as in tests/e2e/test_e2e_reference.py
BOOT_TIMEOUT = 600.0  # the HEALTHCHECK's start period: load, merge and verify on a CPU


def _skip_reason() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # debootstrap and runc live there
    missing = [tool for tool in TOOLS if shutil.which(tool, path=path) is None]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/test.sh installs them with apt-get as root)"
    if os.geteuid() != 0:
        return "not root: debootstrap and buildah's storage need root"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = _skip_reason()
    if reason:
        print(f"test_image: skipped: {reason}")
        pytest.skip(reason)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_image.py"), "--tag", TAG], timeout=2400)
    assert proc.returncode == 0, "scripts/build_image.py failed (its output is above)"
    print(f"test_image: image built in {time.monotonic() - start:.1f} s")
    return TAG


def _podman_env(tmp: Path) -> dict[str, str]:
    """podman's default ulimits (nofile and nproc of 1048576) are above this sandbox's hard limits, which runc may
    not raise ("error setting rlimit type 7"): run with the limits the container inherits instead."""
    conf = tmp / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def _port() -> int:
    from local_server import free_port  # scripts/, on sys.path through tests.live_server

    return free_port()


class Container:
    """`podman run` of the image as it ships, on the host's network (loopback only), its log in a file."""

    def __init__(self, tag: str, tmp: Path) -> None:
        self.name, self.env, self.log = f"mergeserve-test-{uuid.uuid4().hex[:8]}", _podman_env(tmp), tmp / "run.log"
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["podman", "run", "--rm", "--name", self.name, "--runtime", "runc", "--network", "host",
                "-e", "MERGESERVE_HOST=127.0.0.1", "-e", f"MERGESERVE_PORT={self.port}", tag]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def podman(self, *args: str) -> str:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def wait_healthy(self, timeout: float) -> list[int]:
        """Every /health status seen until the 200; raises with the log if the container exits or time runs out."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=5) as client:
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(httpx.TransportError):  # not listening yet
                    seen.append(client.get(f"{self.url}/health").status_code)
                if seen and seen[-1] == 200:
                    return seen
                time.sleep(0.5)
        raise AssertionError(f"no /health 200 (exit {self.proc.poll()}, saw {seen[-5:]}):\n{self.log.read_text()}")

    def stop(self) -> int:
        """The container's exit code after `podman stop` (SIGTERM, then SIGKILL after 30 s); removed either way."""
        if self.proc.poll() is None:
            subprocess.run(["podman", "stop", "--time", "30", self.name], env=self.env, capture_output=True)
            self.proc.wait(timeout=60)
        subprocess.run(["podman", "rm", "--force", "--ignore", self.name], env=self.env, capture_output=True)
        return int(self.proc.returncode)


@pytest.fixture(scope="module")
def box(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """The image's container, healthy; stopped and removed at the end of the module whatever happened."""
    running = Container(image, tmp_path_factory.mktemp("container"))
    start = time.monotonic()
    try:
        seen = running.wait_healthy(BOOT_TIMEOUT)
        print(f"test_image: /health 200 after {time.monotonic() - start:.1f} s (statuses before: {set(seen[:-1])})")
        yield running
    finally:
        running.stop()


def test_server_runs_as_the_non_root_user(box: Container) -> None:
    status = box.podman("exec", box.name, "cat", "/proc/1/status")  # pid 1 is the entrypoint, mergeserve
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}, status
    assert "mergeserve serve" in box.podman("exec", box.name, "cat", "/proc/1/cmdline").replace("\0", " ")


def test_the_images_own_healthcheck_passes(box: Container) -> None:
    """The Dockerfile's HEALTHCHECK command, run in the container (podman schedules it through systemd, absent
    here, so it is run once by hand): `python` must be the venv's and MERGESERVE_PORT the one served on."""
    assert box.podman("image", "inspect", "--format", "{{.Config.Healthcheck.Test}}", TAG).strip().startswith("[CMD")
    proc = subprocess.run(["podman", "healthcheck", "run", box.name], env=box.env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_kernels_come_built_with_the_image_which_has_no_compiler(box: Container) -> None:
    """The image's kernels stage compiled the fused kernels into /opt/mergeserve/kernels (root's, read-only to the
    server's user); the run stage has no compiler, so nothing the server loads can come from a folder it or anyone
    else writes at run time, and the boot loaded that build (this machine built the image, so the CPU matches)."""
    info = httpx.get(f"{box.url}/info", timeout=30, trust_env=False).json()
    assert info["engine"]["fused_kernels"] is True, box.log.read_text()[-4000:]
    assert "(built ahead of time)" in box.log.read_text(), box.log.read_text()[-4000:]
    compilers = box.podman("exec", box.name, "sh", "-c", "command -v g++ gcc c++ cc clang || true")
    assert compilers.strip() == "", compilers
    folder = "/opt/mergeserve/kernels"
    listing = box.podman("exec", box.name, "stat", "-c", "%u %a %n", "/opt", "/opt/mergeserve", folder,
                         f"{folder}/mergeserve_slab_ops.so", f"{folder}/build.json")  # fmt: skip
    assert len(listing.splitlines()) == 5, listing
    for line in listing.splitlines():
        uid, mode, _ = line.split()
        assert uid == "0" and int(mode, 8) & 0o022 == 0, line
    as_server = box.podman("exec", box.name, "sh", "-c", f"test -w {folder} && echo writable || echo read-only")
    assert as_server.strip() == "read-only"  # podman exec runs as the image's USER, 10001


def test_generate_answers_like_peft_merge_of_the_demo(
    box: Container, pirate_reference: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    model, tokenizer = pirate_reference
    prompt = str(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                               add_generation_prompt=True))  # fmt: skip
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
    r = httpx.post(f"{box.url}/generate", json=body, timeout=300, trust_env=False)
    assert r.status_code == 200, r.text
    answer = r.json()
    tokens = [(t["id"], t["logprob"]) for t in answer["details"]["tokens"]]
    print(f"test_image: container answered {answer['generated_text']!r}")
    assert answer["generated_text"].strip() and tokens
    assert answer["generated_text"] == tokenizer.decode([t for t, _ in tokens], skip_special_tokens=True)
    assert_served_like_reference(model, list(tokenizer(prompt).input_ids), tokens, tol=TOL)


def test_sigterm_drains_and_exits_0(box: Container) -> None:
    """Last in the module: `podman stop` sends SIGTERM, as Kubernetes and compose do; the server drains, exits 0."""
    assert box.stop() == 0, box.log.read_text()[-4000:]
