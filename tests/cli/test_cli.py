"""The real CLI process: refusals exit with their code and one line, and leave no port bound."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from safetensors.torch import load_file, save_file

from tests.conftest import build_adapter, build_model, build_tokenizer
from tests.live_server import REPO, LiveServer, free_port, port_is_free

Writer = Callable[[dict[str, Any]], Path]


def _serve(config: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_adapter_for_another_base_exits_2(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    other = tmp_path / "other-base"
    build_model(other, vocab_size=len(build_tokenizer(other)), hidden=32)
    tiny_config_data["adapters"] = [{"name": "wrong", "path": str(build_adapter(other, tmp_path / "wrong", seed=5))}]
    port = free_port()
    proc = _serve(write_config(tiny_config_data), port)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("mergeserve: adapter 'wrong'") and "fix:" in line
    assert "Traceback" not in proc.stderr
    assert port_is_free(port)


def test_merge_that_rounds_away_exits_3(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    faint = tmp_path / "faint"
    faint.mkdir()
    (faint / "adapter_config.json").write_text((tiny_adapters["alpha"] / "adapter_config.json").read_text())
    stored = load_file(str(tiny_adapters["alpha"] / "adapter_model.safetensors"))
    # A delta of ~1e-12 sits far below bf16's resolution of weights of ~0.02, so every targeted weight stays put.
    tensors = {k: v * 1e-12 if ".lora_B." in k else v for k, v in stored.items()}
    save_file(tensors, str(faint / "adapter_model.safetensors"))
    tiny_config_data["adapters"] = [{"name": "faint", "path": str(faint)}]
    tiny_config_data["model"]["dtype"] = "bfloat16"
    port = free_port()
    proc = _serve(write_config(tiny_config_data), port)
    assert proc.returncode == 3, proc.stderr
    line = _last_line(proc)
    assert "merge check failed" in line and "did not change" in line and "fix:" in line
    assert port_is_free(port)


def test_tiny_server_serves_over_http(write_config: Writer, tiny_config_data: dict[str, Any]) -> None:
    with LiveServer(write_config(tiny_config_data), "--mode", "unmerged", boot_timeout=120) as server:
        r = httpx.post(f"{server.url}/generate", json={"inputs": "Arr", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and r.headers["x-merge-mode"] == "unmerged"
        assert httpx.get(f"{server.url}/info").json()["mode"] == "unmerged"
        # Started, awaited and stopped by scripts/local_server.py, the one implementation the scripts use too.
        local = server.local
        assert local is not None and local.proc is server.proc and local.url == server.url
        assert Path(str(sys.modules[type(local).__module__].__file__)) == REPO / "scripts" / "local_server.py"
        assert server.health_history and server.health_history[-1] == 200
    # LiveServer stops it with SIGINT (Ctrl-C): a drain and exit 0, not a KeyboardInterrupt traceback.
    assert server.proc is not None and server.proc.returncode == 0
    log = server.read_log()
    assert "SIGINT: draining" in log and "Traceback" not in log and "KeyboardInterrupt" not in log
