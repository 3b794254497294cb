"""A real Prometheus scrapes a live `ab` server; every recording rule returns a value for each arm."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.live_server import REPO, LiveServer
from tests.prometheus_server import PrometheusServer

RULES = REPO / "configs" / "prometheus" / "rules.yml"


def _records() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["record"] for group in groups for rule in group["rules"]]


def test_rules_pass_promtool() -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_rule_returns_a_value_per_arm(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["mode"] = "ab"
    server = LiveServer(write_config(tiny_config_data), boot_timeout=120)
    with server, PrometheusServer([f"127.0.0.1:{server.port}"], [RULES]) as prom:
        pending = set(_records())
        body = {"inputs": "Arr matey", "parameters": {"max_new_tokens": 6}}
        deadline = time.monotonic() + 90  # bounded: traffic and polling stop here at the latest
        while pending and time.monotonic() < deadline:
            for arm in ("merged", "unmerged"):
                r = httpx.post(f"{server.url}/generate", json=body, headers={"X-Merge-Mode": arm}, timeout=30)
                assert r.status_code == 200
            for record in sorted(pending):
                result = prom.query(record)
                modes = {series["metric"].get("mode") for series in result}
                values = [float(series["value"][1]) for series in result]
                want = {None} if record.startswith("mergeserve:") else {"merged", "unmerged"}
                if modes == want and all(v == v and v > 0 for v in values):  # v == v: not NaN
                    pending.discard(record)
            time.sleep(0.5)
        assert not pending, f"rules without a value per arm: {sorted(pending)}\n{prom.log()[-2000:]}"


@pytest.mark.parametrize("record", _records())
def test_each_rule_is_named_by_convention(record: str) -> None:
    level, metric, operation = record.split(":")
    assert level in ("mode", "mergeserve") and metric and operation.endswith("_1m")
