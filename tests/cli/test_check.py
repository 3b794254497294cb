"""`mergeserve check`: what serve would do, said without loading weights, and serve's own refusal line and code.

Each case runs the real CLI in a subprocess. The references are independent of check's code: the adapter's own
saved config (PEFT wrote it), a real boot that stores the cache entry, and serve's own stderr for the same config.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.boot.boot import boot
from server.config.load import load_config
from tests.conftest import build_adapter
from tests.hub_cache import BASE, LORA, hub_config, publish
from tests.live_server import REPO, free_port

Writer = Callable[[dict[str, Any]], Path]


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _check_json(config: Path) -> dict[str, Any]:
    proc = _cli("check", "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_check_says_miss_then_hit_after_a_boot(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path]
) -> None:
    tiny_config_data["adapters"].append({"name": "rs", "path": str(tiny_adapters["rs"]), "weight": 0.5})
    config = write_config(tiny_config_data)
    before = _check_json(config)
    assert (before["mode"], before["engine"]["kind"], before["dtype"]) == ("merged", "torch", "float32")
    saved = json.loads((tiny_adapters["rs"] / "adapter_config.json").read_text())
    rs = before["adapters"][1]
    assert (rs["name"], rs["rank"], rs["alpha"], rs["weight"]) == ("rs", saved["r"], saved["lora_alpha"], 0.5)
    assert "rslora" in rs["kinds"] and "rslora" not in before["adapters"][0]["kinds"]
    assert before["cache"]["status"] == "miss" and before["refusal"] is None

    engine = boot(load_config(config))  # the real boot stores the entry under the test's cache folder
    assert engine.info.cache["status"] == "miss"
    after = _check_json(config)
    assert after["cache"]["status"] == "hit"
    assert after["cache"]["entries"][0]["key"] == engine.info.cache["key"]
    text = _cli("check", "--config", str(config))
    assert text.returncode == 0 and "cache:    hit" in text.stdout and "serve would start" in text.stdout


def test_a_refused_adapter_exits_2_with_serves_line(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    dora = build_adapter(tiny_base, tmp_path / "dora", seed=5, use_dora=True)
    tiny_config_data["adapters"] = [{"name": "dora", "path": str(dora)}]
    tiny_config_data |= {"mode": "unmerged", "engine": {"kind": "vllm"}}
    config = write_config(tiny_config_data)
    checked = _cli("check", "--config", str(config))
    served = _cli("serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(free_port()))
    assert (checked.returncode, served.returncode) == (2, 2)
    line = checked.stderr.strip().splitlines()
    assert line == [served.stderr.strip().splitlines()[-1]] and "use_dora" in line[0]
    assert "serve would refuse (exit 2)" in checked.stdout


def test_a_bad_config_exits_2(write_config: Writer, tiny_config_data: dict[str, Any]) -> None:
    tiny_config_data["mode"] = "sideways"
    proc = _cli("check", "--config", str(write_config(tiny_config_data)))
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "mode" in proc.stderr and "fix:" in proc.stderr


def test_check_does_not_read_the_weights(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    """A truncated safetensors file cannot be loaded (boot refuses it), yet check passes: it never parses it."""
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_base, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    tiny_config_data["model"]["path"] = str(broken)
    config = write_config(tiny_config_data)
    checked = _cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "serve would start" in checked.stdout
    served = _cli("serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(free_port()))
    assert served.returncode != 0  # the reference: loading these weights does fail


def test_hub_ids_resolve_from_the_cache_and_offline_misses_refuse_as_serve_does(
    tmp_path: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer
) -> None:
    cache = tmp_path / "hf-cache"
    base_sha = publish(cache, BASE, tiny_base, refs=("main", "v1"))
    lora_sha = publish(cache, LORA, tiny_adapters["alpha"], subfolder="alpha")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "MERGESERVE_CACHE_DIR": str(tmp_path / "merge-cache")}  # fmt: skip
    config = write_config(hub_config(f"{BASE}@v1", {"path": LORA, "subfolder": "alpha"}))
    proc = _cli("check", "--config", str(config), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert [(h["key"], h["commit"], h["cached"]) for h in found["hub"]] == [
        ("model.path", base_sha, True),
        ("adapters[0].path", lora_sha, True),
    ]
    assert found["adapters"][0]["path"].endswith(f"{lora_sha}/alpha") and found["cache"]["status"] == "miss"

    absent = write_config(hub_config(f"{BASE}@v1", {"path": "test-org/not-cached"}))
    checked = _cli("check", "--config", str(absent), env=env)
    served = _cli("serve", "--config", str(absent), "--port", str(free_port()), env=env)
    assert (checked.returncode, served.returncode) == (2, 2)
    assert checked.stderr.strip() == served.stderr.strip().splitlines()[-1] and "HF_HUB_OFFLINE" in checked.stderr
